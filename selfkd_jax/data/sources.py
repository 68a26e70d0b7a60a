"""`load_splits`: one entry point from a dataset name to train/test sources and their info.

Every source has `__len__`, `__getitem__(i)` and a vectorised `get_batch(indices)`, each
returning `{'image': uint8 [..., H, W, C], 'label': int32, 'index': int32}`. The index is the
example's position in its split: the same on every host, run and resume, so per-example state
(past predictions, ...) can be keyed by it.
"""
import dataclasses
from typing import Sequence

from selfkd_jax.data import local
from selfkd_jax.data import tfds_source
from selfkd_jax.data.array_source import ArraySource
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.info import DATASET_NAMES, DatasetInfo
from selfkd_jax.data.tfds_source import EncodedImageSource, ImageSizeError, TfdsSource

__all__ = ["ArraySource", "DATASET_NAMES", "DatasetInfo", "EncodedImageSource", "ImageSizeError",
           "TfdsSource", "load_splits"]


def load_splits(name: str, *, data_dir: str | None = None, limit_train: int | None = None,
                synthetic_shape: Sequence[int] = (32, 32, 3), synthetic_classes: int = 100,
                synthetic_train: int = 2048, synthetic_test: int = 512, synthetic_seed: int = 0,
                image_size: int = 0, resize_size: int = 0):
  """Loads the train and test splits of a dataset.

  Datasets:
    * 'fashion_mnist' (default of the configs): the Debian IDX files under `data_dir`
      (default /usr/share/datasets/fashion-mnist); 60000/10000 28x28x1, 10 classes.
      Augmentation defaults: flip=True (clothes are left/right symmetric), crop_padding=2.
    * 'mnist': IDX files when `data_dir` holds them, else the prepared TFDS dataset.
      flip=False, crop_padding=2.
    * 'digits': scikit-learn's bundled 8x8 digits, a fixed 1497/300 split, no augmentation.
    * 'synthetic': generated learnable images (see `local.load_synthetic`), sized by the
      `synthetic_*` arguments, which every other dataset ignores.
    * any other name: an image dataset prepared by TFDS in array_record format under
      `data_dir` (TFDS's default when None). Nothing is ever downloaded. Fixed-size images are
      read as they are; variable-size ones (imagenet2012, imagenette, ...) are decoded and
      cropped per example on the host to `image_size` (`tfds_source.EncodedImageSource`).

  Args:
    name: the dataset name.
    data_dir: the folder of the IDX files (fashion_mnist, mnist) or the TFDS data dir.
    limit_train: keep only the first `limit_train` train examples (indices 0..limit_train-1,
      so indices stay those of the full dataset); None keeps all.
    synthetic_shape: (H, W, C) of synthetic images.
    synthetic_classes: number of synthetic classes.
    synthetic_train: number of synthetic train examples.
    synthetic_test: number of synthetic test examples.
    synthetic_seed: seed of the synthetic data.
    image_size: side of the square images of a variable-size dataset (required there; must be
      0 for every fixed-size dataset).
    resize_size: the eval resize of a variable-size dataset's shorter side (0 = image_size /
      0.875, rounded); must be 0 for fixed-size datasets.

  Returns:
    (train source, test source, DatasetInfo); `info.num_train` counts the kept train examples.

  Raises:
    ImageSizeError: `image_size`/`resize_size` do not fit the dataset (a configuration error).
    DataError: with a one-line message saying what is missing or wrong and what to do.
  """
  if limit_train is not None and limit_train < 1:
    raise DataError(f"limit_train must be a positive number of examples or None, got "
                    f"{limit_train}; fix config.data.limit_train")
  if name == "fashion_mnist":
    train, test, info = local.load_idx_dataset(name, data_dir or local.FASHION_MNIST_DIR)
  elif name == "mnist" and data_dir is not None and local.has_idx_files(data_dir):
    train, test, info = local.load_idx_dataset(name, data_dir)
  elif name == "digits":
    train, test, info = local.load_digits()
  elif name == "synthetic":
    train, test, info = local.load_synthetic(
        synthetic_shape, synthetic_classes, synthetic_train, synthetic_test, synthetic_seed)
  elif name == "mnist":
    try:
      train, test, info = tfds_source.load_tfds(name, data_dir)
    except DataError as e:
      raise DataError(f"{e}; or put the four MNIST IDX files "
                      "({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) in config.data.dir"
                      ) from None
  else:
    train, test, info = tfds_source.load_tfds(name, data_dir, image_size=image_size,
                                              resize_size=resize_size)
  if not info.variable_size and (image_size or resize_size):
    key, value = ("image_size", image_size) if image_size else ("resize_size", resize_size)
    shape = "x".join(map(str, info.image_shape))
    raise ImageSizeError(f"config.data.{key}={value} applies to variable-size datasets only; "
                         f"{name!r} has fixed-size {shape} images: use 0")
  if limit_train is not None and limit_train < len(train):
    train = train.take(limit_train)
    info = dataclasses.replace(info, num_train=len(train))
  return train, test, info
