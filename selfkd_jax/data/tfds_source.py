"""Image datasets prepared by TFDS in array_record format, read without TensorFlow.

Fixed-size datasets (every image H x W x C, e.g. cifar100) are read as they are (`TfdsSource`).
Variable-size ones (an image feature of shape (None, None, C): imagenet2012, imagenette, most
natural-image datasets) are read as encoded bytes and decoded, cropped and resized per example
on the host to `image_size` x `image_size` RGB (`EncodedImageSource`, `image_transforms`).

Nothing here downloads: the prepared dataset is looked up on disk first, and TFDS is only ever
asked for a data source over files that already exist. Without network, TFDS's own download
path would retry for minutes before failing.
"""
import numpy as np

from selfkd_jax.data import image_transforms
from selfkd_jax.data.array_source import check_indices
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.info import (DATASET_NAMES, IMAGENET_DEFAULTS, KNOWN_DEFAULTS, DatasetInfo,
                                  channel_stats)

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


class ImageSizeError(DataError):
  """`image_size`/`resize_size` do not fit the dataset: a configuration error (the trainer
  reports it as one, exit 2)."""


class EncodedImageSource:
  """Variable-size images of a TFDS split, decoded and cropped per example on the host.

  `get_batch` (evaluation, refresh passes) gives the deterministic eval view: shorter side
  resized to `resize_size`, centre crop `image_size`. `get_train_batch` gives the train view:
  a random-resized crop drawn from (seed, epoch, index) (`image_transforms.crop_rng`), the same
  whichever host, thread or worker process reads it. Both return
  `{'image': uint8 [n, image_size, image_size, 3], 'label': int32 [n], 'index': int32 [n]}`.

  Encoded images (a `tfds.features.Image`) are read as their bytes (TFDS's `SkipDecoding`) and
  decoded by PIL; raw variable-size tensors are read as arrays. Nothing but the batch being
  read is held in memory.

  The source pickles as what it reads (the prepared dataset's directory and the split), and a
  copy (a grain worker process) opens the files again with `tfds.builder_from_directory`: no
  builder class travels, so a dataset whose builder is defined in a `__main__` script, or not
  importable at all, is read the same way.
  """

  def __init__(self, builder_dir: str, *, split: str, image_size: int, resize_size: int,
               name: str, encoded: bool = True, length: int | None = None, data_source=None):
    """Reads one split of a prepared dataset.

    Args:
      builder_dir: the prepared dataset's directory (`builder.data_dir`: <data_dir>/<name>/
        [<config>/]<version>).
      split: the split to read; also names it in error messages.
      image_size: side of the square output images.
      resize_size: the eval resize of the shorter side (>= image_size).
      name: names the dataset in error messages.
      encoded: records hold encoded bytes (True) or decoded uint8 arrays (False).
      length: expose only the first `length` examples (all when None).
      data_source: the split's TFDS data source when already open (else opened here).
    """
    if image_size < 1 or resize_size < image_size:
      raise DataError(f"dataset {name!r}: image_size must be >= 1 and resize_size >= "
                      f"image_size, got image_size={image_size}, resize_size={resize_size}")
    self._builder_dir, self._split, self._encoded = str(builder_dir), split, encoded
    self._data_source = data_source if data_source is not None else self._open()
    self._length = (len(self._data_source) if length is None
                    else min(length, len(self._data_source)))
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self._name = name
    self._labels = None

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    decoders = {IMAGE_KEY: tfds.decode.SkipDecoding()} if self._encoded else None
    try:
      builder = tfds.builder_from_directory(self._builder_dir)
      return builder.as_data_source(split=self._split, decoders=decoders)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"cannot open split {self._split!r} of the dataset in "
                      f"{self._builder_dir} ({_first_line(e)}); check that it is still there "
                      "and readable") from None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_data_source"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._data_source = self._open()

  def __len__(self) -> int:
    return self._length

  def _image(self, record, index: int):
    """The example's RGB PIL image, or a DataError naming the split and the example."""
    value = record[IMAGE_KEY]
    try:
      if self._encoded:
        return image_transforms.decode_rgb(bytes(value))
      return image_transforms.array_to_rgb(np.asarray(value))
    except image_transforms.UndecodableImage as e:
      raise DataError(f"dataset {self._name!r}, split {self._split!r}: example {index} is not "
                      f"a decodable image ({e}); re-encode or drop it and rebuild the "
                      "dataset") from None

  def _read(self, indices, transform) -> dict[str, np.ndarray]:
    indices = check_indices(indices, len(self))
    records = self._data_source.__getitems__([int(i) for i in indices])
    size = self.image_size
    images = np.empty((len(indices), size, size, 3), np.uint8)
    for row, (record, i) in enumerate(zip(records, indices)):
      images[row] = transform(row, int(i), self._image(record, int(i)))
    return {"image": images,
            "label": np.array([record[LABEL_KEY] for record in records], np.int32),
            "index": indices.astype(np.int32)}

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The eval view of the examples at `indices`: resize, centre crop."""
    return self._read(indices, lambda row, i, image: image_transforms.eval_transform(
        image, self.image_size, self.resize_size))

  def get_train_batch(self, indices: np.ndarray, *, seed: int, epoch: int,
                      partners_from: int | None = None) -> dict[str, np.ndarray]:
    """The train view of the examples at `indices`: each a random-resized crop drawn from
    (seed, epoch, index); rows from `partners_from` on (same-class partners) draw from their
    own branch."""
    start = len(indices) if partners_from is None else partners_from

    def crop(row, i, image):
      branch = (image_transforms.CROP_BRANCH if row < start
                else image_transforms.PARTNER_CROP_BRANCH)
      rng = image_transforms.crop_rng(seed, epoch, i, branch)
      return image_transforms.train_transform(image, self.image_size, rng)

    return self._read(indices, crop)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    batch = self.get_batch(np.array([index]))
    return {key: value[0] for key, value in batch.items()}

  @property
  def labels(self) -> np.ndarray:
    """Every label, int32 [len]; read once on first use (each record once, images not
    decoded), for same-class partners."""
    if self._labels is None:
      chunks = []
      for start in range(0, len(self), 4096):
        records = self._data_source.__getitems__(list(range(start, min(start + 4096,
                                                                       len(self)))))
        chunks.append(np.array([record[LABEL_KEY] for record in records], np.int32))
      self._labels = np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)
    return self._labels

  def take(self, n: int) -> "EncodedImageSource":
    """Returns a source over the first `n` examples; their indices stay 0..n-1."""
    return EncodedImageSource(self._builder_dir, split=self._split, image_size=self.image_size,
                              resize_size=self.resize_size, name=self._name,
                              encoded=self._encoded, length=min(n, self._length),
                              data_source=self._data_source)


# Datasets TFDS cannot download: the archives are fetched by hand into a manual directory.
_MANUAL = {"imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                           "image-net.org"}


def _not_prepared(name: str, where: str, data_dir: str | None) -> DataError:
  target = data_dir or "~/tensorflow_datasets"
  base = name.split(":")[0].split("/")[0]
  if base in _MANUAL:
    return DataError(
        f"dataset {name!r} is not prepared under {where}; put {_MANUAL[base]} in a folder, run "
        f"`tfds build {name} --data_dir={target} --manual_dir=<that folder> "
        "--file_format=array_record` and set config.data.dir to the data dir")
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


def _check_features(name: str, builder) -> tuple[tuple, int, bool]:
  """(image shape, with None for a variable side; number of classes; whether the images are
  stored encoded, i.e. a `tfds.features.Image`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = builder.info.features
  keys = sorted(features.keys())
  for key in (IMAGE_KEY, LABEL_KEY):
    if key not in features:
      raise DataError(f"dataset {name!r} has no {key!r} feature (it has {keys}); only image "
                      "classification datasets with 'image' and 'label' are supported")
  shape = tuple(features[IMAGE_KEY].shape)
  if len(shape) == 2:
    shape = shape + (1,)
  if len(shape) != 3 or shape[-1] is None:
    raise DataError(f"dataset {name!r} has images of shape {shape}; only [height, width, "
                    "channels] images with a fixed number of channels are supported")
  num_classes = getattr(features[LABEL_KEY], "num_classes", None)
  if not num_classes:
    raise DataError(f"dataset {name!r}: feature {LABEL_KEY!r} is not a ClassLabel, so the "
                    "number of classes is unknown; only classification datasets are supported")
  return shape, int(num_classes), isinstance(features[IMAGE_KEY], tfds.features.Image)


def _data_source(name: str, builder, split: str, data_dir: str | None, decoders=None):
  """TFDS's random-access source of one split (`decoders` as `as_data_source` takes them)."""
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError as e:  # Prepared as tfrecord: no random access.
    raise DataError(f"dataset {name!r} under {builder.data_dir} is not in array_record format "
                    f"({_first_line(e)}); rebuild it with `tfds build {name} "
                    f"--data_dir={data_dir or '~/tensorflow_datasets'} "
                    "--file_format=array_record`") from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read split {split!r} of dataset {name!r} under "
                    f"{builder.data_dir} ({_first_line(e)}); rebuild the dataset") from None


def load_tfds(name: str, data_dir: str | None = None, *, image_size: int = 0,
              resize_size: int = 0):
  """Opens the train and test splits of a prepared TFDS image classification dataset.

  A fixed-size dataset is read as it is (`TfdsSource`). A variable-size one (an image side of
  None in the feature spec) is read through `EncodedImageSource`: every image decoded and
  cropped to `image_size` x `image_size` RGB on the host, a random-resized crop for training
  and resize + centre crop for evaluation.

  Args:
    name: a TFDS name, optionally with config/version (e.g. 'cifar100', 'cifar10:3.0.2').
    data_dir: the TFDS data dir; None means TFDS's default (~/tensorflow_datasets or
      $TFDS_DATA_DIR).
    image_size: the side of the square images of a variable-size dataset (required there);
      0 for fixed-size datasets.
    resize_size: the eval resize of the shorter side of a variable-size dataset; 0 =
      `image_transforms.default_resize_size(image_size)` (224 -> 256).

  Returns:
    (train source, test source, DatasetInfo). The test split is 'test', or 'validation' for
    datasets without one (and for variable-size datasets whose 'test' split is unlabelled,
    label -1, like imagenet2012's).

  Raises:
    ImageSizeError: a variable-size dataset without image_size (or resize_size < image_size).
    DataError: unknown name, dataset not prepared (raised at once, without network), not in
      array_record format, or not an image classification dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _builder(name, data_dir)
  image_shape, num_classes, encoded = _check_features(name, builder)
  variable = image_shape[0] is None or image_shape[1] is None
  if variable:
    resize_size = resize_size or image_transforms.default_resize_size(max(image_size, 1))
    if image_size < 1:
      raise ImageSizeError(
          f"config.data.image_size={image_size} but dataset {name!r} has variable-size images "
          f"{image_shape}; set config.data.image_size to the side of the square images to "
          "train on (e.g. 224)")
    if resize_size < image_size:
      raise ImageSizeError(f"config.data.resize_size={resize_size} is smaller than "
                           f"config.data.image_size={image_size}; use 0 (= image_size / "
                           f"{image_transforms.CROP_FRACTION}) or a size >= image_size")
  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  if "train" not in splits or test_split is None:
    raise DataError(f"dataset {name!r} has splits {sorted(splits.keys())}, but a 'train' and a "
                    "'test' or 'validation' split are needed")
  if variable:
    decoders = {IMAGE_KEY: tfds.decode.SkipDecoding()} if encoded else None
    sources = {split: _data_source(name, builder, split, data_dir, decoders)
               for split in ("train", test_split)}
    if test_split == "test" and len(sources["test"]) and sources["test"][0][LABEL_KEY] < 0:
      # An unlabelled test split (label -1: imagenet2012's, when its test archive was given
      # to `tfds build`): evaluate on the validation split, as everyone does for ImageNet.
      if "validation" not in splits:
        raise DataError(f"dataset {name!r}: its 'test' split is unlabelled (label -1) and it "
                        "has no 'validation' split to evaluate on")
      test_split = "validation"
      sources = {"train": sources["train"],
                 "validation": _data_source(name, builder, "validation", data_dir, decoders)}
    train, test = (EncodedImageSource(
        str(builder.data_dir), split=split, image_size=image_size, resize_size=resize_size,
        name=name, encoded=encoded, data_source=sources[split])
                   for split in ("train", test_split))
    # Natural images of any size: ImageNet's statistics (torchvision's reference recipe) unless
    # the dataset has its own, and the random flip of the same recipe.
    defaults = KNOWN_DEFAULTS.get(builder.name, IMAGENET_DEFAULTS)
    return train, test, DatasetInfo(
        name=name, num_classes=num_classes, image_shape=(image_size, image_size, 3),
        num_train=len(train), num_test=len(test), mean=defaults.mean, std=defaults.std,
        flip=defaults.flip, crop_padding=defaults.crop_padding, variable_size=True)
  train = TfdsSource(_data_source(name, builder, "train", data_dir), name=name)
  test = TfdsSource(_data_source(name, builder, test_split, data_dir), name=name)
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
