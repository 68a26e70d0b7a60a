"""What the trainer needs to know about a dataset, and the defaults we pick per dataset."""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a loaded dataset.

  Attributes:
    name: the name given to `load_splits`.
    num_classes: labels lie in [0, num_classes).
    image_shape: (H, W, C) of every image.
    num_train: examples in the train source (after `limit_train`).
    num_test: examples in the test source.
    mean: per-channel mean on the [0, 1] scale, for `normalize`.
    std: per-channel standard deviation on the [0, 1] scale.
    flip: whether a random horizontal flip is a label-preserving augmentation here.
    crop_padding: default zero padding of the random crop, 0 for no crop.
    variable_size: the dataset's own images vary in size; they are decoded and cropped to
      `image_shape` on the host (`tfds_source.EncodedImageSource`).
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool
  crop_padding: int
  variable_size: bool = False


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Normalisation statistics and augmentation defaults of a known dataset."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool
  crop_padding: int


# Train-split statistics on the [0, 1] scale. CIFAR std is the per-pixel one
# (0.247, 0.243, 0.261), not the often-copied (0.2023, 0.1994, 0.2010), which is the std of
# per-image means; either works, the per-pixel one is what `normalize` assumes.
KNOWN_DEFAULTS: dict[str, Defaults] = {
    # Clothes are left/right symmetric (a flipped shoe is still a shoe) and random flips are the
    # usual Fashion-MNIST augmentation. A 2-pixel pad on 28x28 is the same relative shift as the
    # usual 4 pixels on 32x32 CIFAR.
    "fashion_mnist": Defaults(mean=(0.2860,), std=(0.3530,), flip=True, crop_padding=2),
    # Digits are not mirror symmetric (a flipped 2 is no digit), so only small shifts.
    "mnist": Defaults(mean=(0.1307,), std=(0.3081,), flip=False, crop_padding=2),
    "cifar10": Defaults(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                        flip=True, crop_padding=4),
    "cifar100": Defaults(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                         flip=True, crop_padding=4),
}


# ImageNet's train statistics as torchvision's reference scripts normalise with them; the
# default of every variable-size (natural image) dataset without its own entry above. The
# random horizontal flip of the same recipe; its crop is the host's random-resized crop, so no
# padded crop on the device.
IMAGENET_DEFAULTS = Defaults(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), flip=True,
                             crop_padding=0)
KNOWN_DEFAULTS["imagenet2012"] = IMAGENET_DEFAULTS


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std on the [0, 1] scale of uint8 images [N, H, W, C]."""
  scaled = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  std = np.maximum(scaled.std(axis=0), 1e-3)  # A constant channel must not divide by zero.
  return tuple(float(m) for m in scaled.mean(axis=0)), tuple(float(s) for s in std)

# Datasets that load on every machine without network or preparation: Fashion-MNIST from the
# Debian package, scikit-learn's bundled digits, and generated images.
DATASET_NAMES = ("fashion_mnist", "digits", "synthetic")
