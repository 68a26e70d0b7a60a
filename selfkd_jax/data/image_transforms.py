"""Host-side transforms of encoded images (JPEG, PNG, ...) of variable size, with PIL.

The ImageNet recipe of torchvision's reference scripts, on the host, one example at a time:

* train: decode -> RGB -> `random_resized_crop_box` (torchvision's
  `RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))`: 10 attempts of area and
  log-ratio sampling, then the centre-crop fallback) -> crop -> bilinear resize to size x size;
* eval: decode -> RGB -> bilinear resize of the shorter side to `resize_size` -> centre crop
  size x size (torchvision's `Resize(resize_size)` + `CenterCrop(size)`).

The random horizontal flip and the normalisation are not here: they stay on the device
(`augment.augment_batch` with crop_padding 0 and flip on), like every other dataset's.

The train crop draws from `np.random.default_rng([seed, epoch, index, branch])`: it depends on
the seed, the epoch and the example's dataset index only, never on which host, thread or
worker process runs it, nor on the batch the example is in.

Where this differs from torchvision (on PIL images):
* the random numbers: numpy's PCG64 in float64 here, torch's generator in float32 there. The
  distribution of (top, left, height, width) is the same; the values for a given seed are not.
* nothing else: the same integer rounding (Python's `round`, half to even, of the crop sides;
  `(H - h) // 2` for the fallback's offsets; `round((H - S) / 2)` for the centre crop;
  `int(R * long / short)` for the longer side of the resize), the same PIL calls (`crop` then
  `resize(..., BILINEAR)`, which PIL antialiases when it shrinks, as torchvision's PIL path
  does), the same RGB conversion as torchvision's `ImageFolder` loader (`convert('RGB')`: an
  alpha channel is dropped, grayscale is replicated, CMYK is converted by PIL).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

# torchvision's RandomResizedCrop defaults (Inception's crop).
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
# The eval resize is image_size / CROP_FRACTION: 224 -> 256.
CROP_FRACTION = 0.875
# Keys of the train crop's generator: [seed, epoch, index, branch]. Anchors and same-class
# partners (CS-KD) draw from different branches, so a partner that is also an anchor of the
# same epoch is cropped differently (as the on-device augmentation does with PARTNER_BRANCH).
CROP_BRANCH = 0x1C7
PARTNER_CROP_BRANCH = 0x1C8


class UndecodableImage(ValueError):
  """PIL cannot decode the bytes; the message is PIL's first line."""


def default_resize_size(image_size: int) -> int:
  """`config.data.resize_size=0`: image_size / 0.875, rounded (224 -> 256, 32 -> 37)."""
  return int(round(image_size / CROP_FRACTION))


def decode_rgb(data: bytes) -> Image.Image:
  """Decodes encoded image bytes to an RGB PIL image (fully loaded).

  Raises:
    UndecodableImage: the bytes are not an image PIL can decode (truncated, corrupt, unknown
      format).
  """
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
  except UnidentifiedImageError:  # its message names a BytesIO object's address: useless
    raise UndecodableImage("not in an image format PIL recognises") from None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises OSError, SyntaxError, ...)
    text = str(e).strip().splitlines()
    raise UndecodableImage(text[0] if text else type(e).__name__) from None


def array_to_rgb(array: np.ndarray) -> Image.Image:
  """An already decoded uint8 image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] as RGB."""
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
      array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
    raise UndecodableImage(f"a {array.dtype} array of shape {array.shape}, not a uint8 "
                           "grayscale, RGB or RGBA image")
  image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
  return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = SCALE,
                            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of an Inception-style random crop.

  torchvision's `RandomResizedCrop.get_params`, with numpy's generator: up to ATTEMPTS times,
  an area fraction uniform in `scale` and an aspect ratio (width / height) log-uniform in
  `ratio` give w = round(sqrt(area * r)), h = round(sqrt(area / r)); the first that fits
  (0 < w <= width, 0 < h <= height) is placed at a uniform offset (top first, then left). If
  none fits, the fallback is a centred crop: the whole image when its own ratio lies in
  `ratio`, else the largest centred crop at the nearest bound of `ratio`.
  """
  area = height * width
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_rng(seed: int, epoch: int, index: int, branch: int = CROP_BRANCH) -> np.random.Generator:
  """The train crop's generator of one example: a function of these four integers only."""
  return np.random.default_rng([int(seed), int(epoch), int(index), int(branch)])


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """Random-resized crop of an RGB image, bilinear to uint8 [size, size, 3]."""
  top, left, h, w = random_resized_crop_box(image.height, image.width, rng)
  cropped = image.crop((left, top, left + w, top + h))
  return np.asarray(cropped.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_shorter_side(image: Image.Image, resize_size: int) -> Image.Image:
  """torchvision's `Resize(resize_size)` on a PIL image: the shorter side becomes
  `resize_size`, the longer `int(resize_size * long / short)` (truncated), bilinear."""
  width, height = image.size
  if width <= height:
    new_width, new_height = resize_size, int(resize_size * height / width)
  else:
    new_width, new_height = int(resize_size * width / height), resize_size
  if (new_width, new_height) == (width, height):
    return image
  return image.resize((new_width, new_height), Image.BILINEAR)


def eval_transform(image: Image.Image, size: int, resize_size: int) -> np.ndarray:
  """Resize the shorter side to `resize_size` (>= size), centre crop size x size: uint8
  [size, size, 3]. The crop's offsets are torchvision's `round((H - size) / 2)`."""
  resized = resize_shorter_side(image, resize_size)
  top = int(round((resized.height - size) / 2.0))
  left = int(round((resized.width - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
