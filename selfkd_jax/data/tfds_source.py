"""Fixed-size image datasets prepared by TFDS in array_record format, read without TensorFlow.

Nothing here downloads: the prepared dataset is looked up on disk first, and TFDS is only ever
asked for a data source over files that already exist. Without network, TFDS's own download
path would retry for minutes before failing.
"""
import numpy as np

from selfkd_jax.data.array_source import check_indices
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.info import DATASET_NAMES, KNOWN_DEFAULTS, DatasetInfo, channel_stats

IMAGE_KEY = "image"
LABEL_KEY = "label"
_STATS_SAMPLE = 1024  # Examples used to estimate mean/std of a dataset without known stats.


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class TfdsSource:
  """Random access to a TFDS data source, yielding `{'image', 'label', 'index'}`.

  The index is the position in the TFDS split, which TFDS keeps fixed for a prepared dataset.
  """

  def __init__(self, data_source, *, length: int | None = None, name: str = "tfds"):
    """Wraps a TFDS data source.

    Args:
      data_source: what `tfds.data_source`/`builder.as_data_source` returns.
      length: expose only the first `length` examples (all when None).
      name: names the dataset in error messages.
    """
    self._data_source = data_source
    self._length = len(data_source) if length is None else min(length, len(data_source))
    self._name = name

  def __len__(self) -> int:
    return self._length

  def _decode(self, record, index: int):
    image = np.asarray(record[IMAGE_KEY])
    if image.ndim == 2:  # Some grayscale features decode without a channel axis.
      image = image[..., None]
    if image.dtype != np.uint8:
      raise DataError(f"dataset {self._name!r}: example {index} has {image.dtype} images, only "
                      "uint8 images are supported; pick another dataset or convert it")
    return image, np.int32(record[LABEL_KEY])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    (i,) = check_indices([index], len(self))
    image, label = self._decode(self._data_source[int(i)], int(i))
    return {"image": image, "label": label, "index": np.int32(i)}

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads and decodes the examples at `indices` in one batched read."""
    indices = check_indices(indices, len(self))
    records = self._data_source.__getitems__([int(i) for i in indices])
    decoded = [self._decode(r, int(i)) for r, i in zip(records, indices)]
    shapes = {image.shape for image, _ in decoded}
    if len(shapes) > 1:
      raise DataError(f"dataset {self._name!r} has images of different sizes {sorted(shapes)}; "
                      "only fixed-size datasets are supported")
    return {"image": np.stack([image for image, _ in decoded]),
            "label": np.array([label for _, label in decoded], np.int32),
            "index": indices.astype(np.int32)}

  def take(self, n: int) -> "TfdsSource":
    """Returns a source over the first `n` examples; their indices stay 0..n-1."""
    return TfdsSource(self._data_source, length=min(n, self._length), name=self._name)


def _not_prepared(name: str, where: str, data_dir: str | None) -> DataError:
  target = data_dir or "~/tensorflow_datasets"
  return DataError(
      f"dataset {name!r} is not prepared under {where}; prepare it on a machine with network "
      f"access with `tfds build {name} --data_dir={target} --file_format=array_record`, copy "
      "the folder here and set config.data.dir to it")


def _builder(name: str, data_dir: str | None):
  """Returns the TFDS builder of a prepared dataset, checking everything before any reading."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow, optional)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"unknown dataset {name!r}: neither an embedded dataset "
                    f"{', '.join(DATASET_NAMES)} nor a TFDS dataset; use one of those or a TFDS "
                    "name such as cifar100") from None
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises many types here)
    raise DataError(f"cannot open TFDS dataset {name!r} under {data_dir or 'the TFDS default'} "
                    f"({_first_line(e)}); check the name and config.data.dir") from None
  # `is_prepared` only looks for dataset_info.json on disk; it never downloads.
  if not builder.is_prepared():
    raise _not_prepared(name, str(builder.data_dir), data_dir)
  return builder


def _check_features(name: str, builder) -> tuple[tuple[int, int, int], int]:
  features = builder.info.features
  keys = sorted(features.keys())
  for key in (IMAGE_KEY, LABEL_KEY):
    if key not in features:
      raise DataError(f"dataset {name!r} has no {key!r} feature (it has {keys}); only image "
                      "classification datasets with 'image' and 'label' are supported")
  shape = tuple(features[IMAGE_KEY].shape)
  if len(shape) == 2:
    shape = shape + (1,)
  if len(shape) != 3 or any(s is None for s in shape):
    raise DataError(f"dataset {name!r} has variable-size images {shape}; only fixed-size "
                    "datasets are supported (resize it into a fixed-size TFDS dataset first)")
  num_classes = getattr(features[LABEL_KEY], "num_classes", None)
  if not num_classes:
    raise DataError(f"dataset {name!r}: feature {LABEL_KEY!r} is not a ClassLabel, so the "
                    "number of classes is unknown; only classification datasets are supported")
  return shape, int(num_classes)


def _data_source(name: str, builder, split: str, data_dir: str | None) -> TfdsSource:
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # Prepared as tfrecord: no random access.
    raise DataError(f"dataset {name!r} under {builder.data_dir} is not in array_record format "
                    f"({_first_line(e)}); rebuild it with `tfds build {name} "
                    f"--data_dir={data_dir or '~/tensorflow_datasets'} "
                    "--file_format=array_record`") from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read split {split!r} of dataset {name!r} under "
                    f"{builder.data_dir} ({_first_line(e)}); rebuild the dataset") from None
  return TfdsSource(source, name=name)


def load_tfds(name: str, data_dir: str | None = None):
  """Opens the train and test splits of a prepared, fixed-size TFDS image dataset.

  Args:
    name: a TFDS name, optionally with config/version (e.g. 'cifar100', 'cifar10:3.0.2').
    data_dir: the TFDS data dir; None means TFDS's default (~/tensorflow_datasets or
      $TFDS_DATA_DIR).

  Returns:
    (train TfdsSource, test TfdsSource, DatasetInfo). The test split is 'test', or
    'validation' for datasets without one.

  Raises:
    DataError: unknown name, dataset not prepared (raised at once, without network), not in
      array_record format, or not a fixed-size image classification dataset.
  """
  builder = _builder(name, data_dir)
  image_shape, num_classes = _check_features(name, builder)
  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test_split is None:
    raise DataError(f"dataset {name!r} has splits {sorted(splits.keys())}, but a 'train' and a "
                    "'test' or 'validation' split are needed")
  train = _data_source(name, builder, "train", data_dir)
  test = _data_source(name, builder, test_split, data_dir)
  defaults = KNOWN_DEFAULTS.get(builder.name)
  if defaults is not None:
    mean, std, flip, crop_padding = (defaults.mean, defaults.std, defaults.flip,
                                     defaults.crop_padding)
  else:
    # Unknown dataset: estimate the statistics from a fixed sample, and assume no symmetry.
    sample = train.get_batch(np.arange(min(_STATS_SAMPLE, len(train))))["image"]
    (mean, std), flip, crop_padding = channel_stats(sample), False, 0
  info = DatasetInfo(name=name, num_classes=num_classes, image_shape=image_shape,
                     num_train=len(train), num_test=len(test), mean=mean, std=std, flip=flip,
                     crop_padding=crop_padding)
  return train, test, info
