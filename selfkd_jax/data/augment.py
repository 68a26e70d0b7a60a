"""On-device augmentation whose randomness belongs to the example, not to its batch slot.

Each example draws from `fold_in(fold_in(key, epoch), index)`. The result depends only on
(key, epoch, dataset index), so it is the same whichever device, batch position or device
count processes the example, and the same after a resume. Call it inside the per-device step
on the device-local slice: it needs nothing but the examples' own indices.

Per example, in the order of the official torchvision pipelines (`Compose` order):
random crop (padding filled with `crop_fill`) -> horizontal flip -> random rotation
(`geometry`) -> AutoAugment (`autoaugment`) -> Cutout -> colour jitter and lighting (`color`, on
the [0, 1] float image) -> normalisation. Crop and flip draw from
the same keys whether or not the later steps are on, so turning those on changes nothing else.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from selfkd_jax.data import autoaugment as autoaugment_lib
from selfkd_jax.data import color
from selfkd_jax.data import geometry

AUTOAUGMENT_POLICIES = ("none",) + tuple(autoaugment_lib.POLICIES)
# Rotation, AutoAugment and Cutout draw from the example key folded with this, away from the
# crop and flip keys (which `split` the example key itself, as before these existed).
_EXTRA_BRANCH = 0x5E1F
# Colour jitter and lighting (ImageNet recipes) draw from their own branch too.
_COLOR_BRANCH = 0xC010


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Maps uint8 images [..., C] to float32 `(x / 255 - mean) / std`, per channel."""
  scaled = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def apply_cutout(image: jax.Array, uniforms: jax.Array, length: int) -> jax.Array:
  """DeVries & Taylor's Cutout as BYOT's journal code runs it: a centre uniform over all H x W
  pixels (from two uniforms in [0, 1)), the rows and columns [centre - length // 2,
  centre + length // 2) clipped at the border set to 0, all channels. (That code applies it
  after ToTensor and before Normalize, so the hole is black: 0 on the uint8 image is the same.)"""
  height, width, _ = image.shape
  half = length // 2
  sides = jnp.array([height, width])
  centre = jnp.minimum((uniforms * sides).astype(jnp.int32), sides - 1)
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows >= centre[0] - half) & (rows < centre[0] + half)
  in_cols = (cols >= centre[1] - half) & (cols < centre[1] + half)
  hole = in_rows[:, None, None] & in_cols[None, :, None]
  return jnp.where(hole, jnp.zeros_like(image), image)


def _augment_one(image: jax.Array, key: jax.Array, crop_padding: int, flip: bool,
                 crop_fill: int = 0, rotation_degrees: float = 0.0, autoaugment: str = "none",
                 cutout_length: int = 0) -> jax.Array:
  crop_key, flip_key = jax.random.split(key)
  if crop_padding > 0:
    # Pad with `crop_fill` (0 = black, as torchvision's RandomCrop(padding=p); BYOT's journal
    # code uses fill=128) and cut an H x W window at a random offset in [0, 2p] on each axis.
    p = crop_padding
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)), constant_values=jnp.uint8(crop_fill))
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape)
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
  if rotation_degrees > 0 or autoaugment != "none" or cutout_length > 0:
    # One draw for all three (each PRNG call adds compile time), each with its own slots:
    # turning one on or off changes none of the others.
    uniforms = jax.random.uniform(jax.random.fold_in(key, _EXTRA_BRANCH), (8,))
    if rotation_degrees > 0:
      # torchvision's RandomRotation(d): an angle uniform in [-d, d], NEAREST, fill 0.
      degrees = rotation_degrees * (2 * uniforms[0] - 1)
      image = geometry.rotate(image, degrees, fill=0)
    if autoaugment != "none":
      image = autoaugment_lib.apply_policy(image, uniforms[1:6], autoaugment)
    if cutout_length > 0:
      image = apply_cutout(image, uniforms[6:8], cutout_length)
  return image


def augment_batch(images: jax.Array, indices: jax.Array, *, key: jax.Array, epoch,
                  crop_padding: int, flip: bool, mean: Sequence[float],
                  std: Sequence[float], crop_fill: int = 0, rotation_degrees: float = 0.0,
                  autoaugment: str = "none", cutout: int = 0, color_jitter: float = 0.0,
                  lighting: float = 0.0) -> jax.Array:
  """Random crop, horizontal flip, and optionally rotation, AutoAugment and Cutout, then
  `normalize`.

  Args:
    images: uint8 [B, H, W, C].
    indices: int [B] dataset indices of the examples (non-negative).
    key: PRNG key of the run, the same on every device.
    epoch: epoch number (Python int or traced scalar); a new epoch draws new augmentations.
    crop_padding: static; pad each side by this many pixels of value `crop_fill`, then crop
      back to H x W at a random offset. 0 disables the crop.
    flip: static; mirror left/right with probability 1/2.
    mean: per-channel mean on the [0, 1] scale.
    std: per-channel std on the [0, 1] scale.
    crop_fill: static; 0..255, the value of the crop's padding (all channels).
    rotation_degrees: static; > 0 rotates by an angle uniform in [-d, d] degrees
      (torchvision's RandomRotation(d): NEAREST, about the centre, 0 outside). 0 disables it.
    autoaugment: static; "none" or a policy of `autoaugment.POLICIES` ("cifar10").
    cutout: static; > 0 blacks out a square of this side (clipped at the border). 0 disables it.
    color_jitter: static; > 0 applies brightness, contrast and saturation jitter of this
      strength in a random order, on the [0, 1] image before normalising (`color`; PS-KD's
      ImageNet recipe: 0.4). 0 disables it.
    lighting: static; > 0 adds AlexNet's PCA lighting noise with this standard deviation
      (`color`; PS-KD's ImageNet recipe: 0.1). 0 disables it.

  Returns:
    float32 [B, H, W, C]. With crop_padding=0, flip=False and the others off it equals
    `normalize(images, mean, std)`.
  """
  crop_padding, crop_fill, cutout = int(crop_padding), int(crop_fill), int(cutout)
  rotation_degrees = float(rotation_degrees)
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
  if not 0 <= crop_fill <= 255:
    raise ValueError(f"crop_fill must be in 0..255, got {crop_fill}")
  if not rotation_degrees >= 0:
    raise ValueError(f"rotation_degrees must be >= 0, got {rotation_degrees}")
  if autoaugment not in AUTOAUGMENT_POLICIES:
    raise ValueError(f"autoaugment must be one of {AUTOAUGMENT_POLICIES}, got {autoaugment!r}")
  if cutout < 0:
    raise ValueError(f"cutout must be >= 0, got {cutout}")
  epoch_key = jax.random.fold_in(key, epoch)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(jnp.asarray(indices))
  augmented = jax.vmap(lambda image, k: _augment_one(
      image, k, crop_padding, bool(flip), crop_fill, rotation_degrees, autoaugment, cutout))(
          jnp.asarray(images), example_keys)
  color_jitter, lighting = float(color_jitter), float(lighting)
  if not (color_jitter >= 0 and lighting >= 0):
    raise ValueError(f"color_jitter and lighting must be >= 0, got {color_jitter}, {lighting}")
  if color_jitter == 0 and lighting == 0:
    return normalize(augmented, mean, std)
  # Colour works on the [0, 1] float image, after the geometric steps, before normalising.
  scaled = jax.vmap(lambda image, k: color.color_augment(
      image.astype(jnp.float32) / 255.0, jax.random.fold_in(k, _COLOR_BRANCH), color_jitter,
      lighting))(augmented, example_keys)
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
