"""Datasets that load without TFDS: IDX files (Fashion-MNIST, MNIST), sklearn digits, synthetic."""
import os

import numpy as np

from selfkd_jax.data import idx
from selfkd_jax.data.array_source import ArraySource
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.info import KNOWN_DEFAULTS, DatasetInfo, channel_stats

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_STEMS = {"train": "train", "test": "t10k"}

DIGITS_NUM_TEST = 300
_DIGITS_SPLIT_SEED = 0


def _idx_file(folder: str, stem: str) -> str:
  """Returns `folder/stem.gz` or, if only the unpacked file is there, `folder/stem`."""
  gz = os.path.join(folder, stem + ".gz")
  plain = os.path.join(folder, stem)
  if not os.path.exists(gz) and os.path.exists(plain):
    return plain
  return gz  # When neither exists, the error names the file the Debian package installs.


def has_idx_files(folder: str) -> bool:
  """Whether `folder` holds the four IDX files of an MNIST-like dataset."""
  return all(os.path.exists(_idx_file(folder, f"{prefix}-{kind}-ubyte"))
             for prefix in _IDX_STEMS.values() for kind in ("images-idx3", "labels-idx1"))


def _read_idx_split(folder: str, split: str, num_classes: int) -> ArraySource:
  prefix = _IDX_STEMS[split]
  images_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
  labels_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
  images = idx.read_idx_images(images_path)
  labels = idx.read_idx_labels(labels_path)
  idx.check_images_and_labels(images, labels, num_classes, f"{images_path} + {labels_path}")
  return ArraySource(images[..., None], labels)


def load_idx_dataset(name: str, folder: str, num_classes: int = 10):
  """Loads an MNIST-like dataset from its four IDX files in `folder`.

  Args:
    name: 'fashion_mnist' or 'mnist' (picks the statistics and augmentation defaults).
    folder: holds {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
    num_classes: labels must lie in [0, num_classes).

  Returns:
    (train ArraySource, test ArraySource, DatasetInfo).
  """
  train = _read_idx_split(folder, "train", num_classes)
  test = _read_idx_split(folder, "test", num_classes)
  if train.images.shape[1:] != test.images.shape[1:]:
    raise DataError(f"IDX files in {folder!r}: train images are {train.images.shape[1:]} but "
                    f"test images {test.images.shape[1:]}; the files belong to different datasets")
  defaults = KNOWN_DEFAULTS[name]
  info = DatasetInfo(name=name, num_classes=num_classes, image_shape=train.images.shape[1:],
                     num_train=len(train), num_test=len(test), mean=defaults.mean,
                     std=defaults.std, flip=defaults.flip, crop_padding=defaults.crop_padding)
  return train, test, info


def load_digits():
  """Loads scikit-learn's bundled 8x8 digits with a fixed 1497/300 train/test split.

  The split is a permutation drawn from a fixed seed, so it (and every example's index) is
  the same on every machine and run. Pixel values 0..16 are rescaled to 0..255.

  Returns:
    (train ArraySource, test ArraySource, DatasetInfo).
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (only this loader needs it)

  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(images))
  train_rows, test_rows = order[:-DIGITS_NUM_TEST], order[-DIGITS_NUM_TEST:]
  train = ArraySource(images[train_rows], labels[train_rows])
  test = ArraySource(images[test_rows], labels[test_rows])
  mean, std = channel_stats(train.images)
  # The digits fill most of the 8x8 frame, so even a one-pixel shift cuts strokes; and they
  # are not mirror symmetric. Hence no augmentation by default.
  info = DatasetInfo(name="digits", num_classes=10, image_shape=(8, 8, 1), num_train=len(train),
                     num_test=len(test), mean=mean, std=std, flip=False, crop_padding=0)
  return train, test, info


def _synthetic_images(rng, prototypes, labels, noise_std, chunk=4096):
  """Draws prototype + Gaussian noise images in chunks, to bound float32 temporaries."""
  images = np.empty((len(labels),) + prototypes.shape[1:], np.uint8)
  for start in range(0, len(labels), chunk):
    rows = labels[start:start + chunk]
    noise = rng.standard_normal((len(rows),) + prototypes.shape[1:], dtype=np.float32)
    images[start:start + chunk] = np.clip(prototypes[rows] + noise_std * noise, 0, 255)
  return images


def load_synthetic(shape=(32, 32, 3), num_classes=100, num_train=2048, num_test=512, seed=0,
                   noise_std=48.0):
  """Generates a learnable random image classification dataset.

  Every class has a prototype: a coarse 4x4 grid of random colours upsampled to H x W (low
  frequency, so it survives small crops and a CNN with pooling can pick it up). An image is its
  class prototype plus Gaussian pixel noise. Classes are balanced. Train and test draw noise
  from separate streams, so changing one size does not change the other split.

  Args:
    shape: (H, W, C).
    num_classes: number of classes.
    num_train: train examples.
    num_test: test examples.
    seed: generator seed; the same seed gives the same dataset everywhere.
    noise_std: per-pixel noise on the 0..255 scale.

  Returns:
    (train ArraySource, test ArraySource, DatasetInfo).
  """
  height, width, channels = (int(s) for s in shape)
  if min(height, width, channels, num_classes, num_train, num_test) < 1:
    raise DataError(f"synthetic dataset needs positive sizes, got shape {tuple(shape)}, "
                    f"{num_classes} classes, {num_train}/{num_test} examples; fix "
                    "synthetic_shape/synthetic_classes/synthetic_train/synthetic_test")
  grid = 4
  coarse = np.random.default_rng([seed, 0]).uniform(
      32, 224, size=(num_classes, grid, grid, channels)).astype(np.float32)
  rows = np.arange(height) * grid // height
  cols = np.arange(width) * grid // width
  prototypes = coarse[:, rows][:, :, cols]

  def split(stream, n):
    rng = np.random.default_rng([seed, stream])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    return ArraySource(_synthetic_images(rng, prototypes, labels, noise_std), labels)

  train, test = split(1, num_train), split(2, num_test)
  mean, std = channel_stats(train.images[:4096])
  # The prototypes are not mirror symmetric (a flip would move class evidence), but they are
  # coarse, so CIFAR-like shifts (4 pixels at 32x32) keep the class and exercise the crop.
  info = DatasetInfo(name="synthetic", num_classes=num_classes,
                     image_shape=(height, width, channels), num_train=num_train,
                     num_test=num_test, mean=mean, std=std, flip=False,
                     crop_padding=height // 8)
  return train, test, info
