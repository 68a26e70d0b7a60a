"""On-device augmentation whose randomness belongs to the example, not to its batch slot.

Each example draws from `fold_in(fold_in(key, epoch), index)`. The result depends only on
(key, epoch, dataset index), so it is the same whichever device, batch position or device
count processes the example, and the same after a resume. Call it inside the per-device step
on the device-local slice: it needs nothing but the examples' own indices.
"""
from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Maps uint8 images [..., C] to float32 `(x / 255 - mean) / std`, per channel."""
  scaled = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _augment_one(image: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  crop_key, flip_key = jax.random.split(key)
  if crop_padding > 0:
    # Pad with zeros (black, before normalisation, as torchvision's RandomCrop(padding=p) does)
    # and cut an H x W window at a random offset in [0, 2p] on each axis.
    p = crop_padding
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape)
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
  return image


def augment_batch(images: jax.Array, indices: jax.Array, *, key: jax.Array, epoch,
                  crop_padding: int, flip: bool, mean: Sequence[float],
                  std: Sequence[float]) -> jax.Array:
  """Random crop with zero padding and random horizontal flip, then `normalize`.

  Args:
    images: uint8 [B, H, W, C].
    indices: int [B] dataset indices of the examples (non-negative).
    key: PRNG key of the run, the same on every device.
    epoch: epoch number (Python int or traced scalar); a new epoch draws new crops and flips.
    crop_padding: static; pad each side by this many zero pixels, then crop back to H x W at a
      random offset. 0 disables the crop.
    flip: static; mirror left/right with probability 1/2.
    mean: per-channel mean on the [0, 1] scale.
    std: per-channel std on the [0, 1] scale.

  Returns:
    float32 [B, H, W, C]. With crop_padding=0 and flip=False it equals
    `normalize(images, mean, std)`.
  """
  crop_padding = int(crop_padding)
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
  epoch_key = jax.random.fold_in(key, epoch)
  example_keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(jnp.asarray(indices))
  augmented = jax.vmap(lambda image, k: _augment_one(image, k, crop_padding, bool(flip)))(
      jnp.asarray(images), example_keys)
  return normalize(augmented, mean, std)
