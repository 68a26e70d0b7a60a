"""augment_batch: randomness per (key, epoch, index), identity when off, real flips and crops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfkd_jax import data

H, W, C = 8, 7, 3
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# Compiled once per shape and option set; eager dispatch of the vmapped ops is much slower.
augment = jax.jit(data.augment_batch, static_argnames=("crop_padding", "flip", "mean", "std"))


def _images(batch=32, seed=0):
  # No zero pixel: zeros in an output can only come from the crop padding.
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (batch, H, W, C), dtype=np.uint8), np.arange(batch) + 100


def _raw(images, indices, *, epoch=0, crop_padding=2, flip=True, key=0):
  """Augments with mean 0 / std 1 and maps back to the 0..255 pixel scale."""
  out = augment(images, indices, key=jax.random.key(key), epoch=epoch,
                crop_padding=crop_padding, flip=flip, mean=(0.0,) * C, std=(1.0,) * C)
  return np.rint(np.asarray(out) * 255).astype(np.int64)


def test_normalize_matches_numpy():
  images, _ = _images(4)
  expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(data.normalize(images, MEAN, STD), expected, rtol=1e-5, atol=1e-6)


def test_off_is_identity():
  images, indices = _images()
  out = augment(images, indices, key=jax.random.key(0), epoch=3, crop_padding=0, flip=False,
                mean=MEAN, std=STD)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(_raw(images, indices, crop_padding=0, flip=False), images)


def test_independent_of_batch_position():
  images, indices = _images()
  full = _raw(images, indices)
  order = np.random.default_rng(1).permutation(len(images))
  np.testing.assert_array_equal(_raw(images[order], indices[order]), full[order])
  np.testing.assert_array_equal(_raw(images[5:9], indices[5:9]), full[5:9])
  # The index, not the pixels or slot, picks the randomness: another index changes it.
  assert not np.array_equal(_raw(images, indices + 1), full)


@pytest.mark.cross_device
def test_one_and_four_devices_agree():
  images, indices = _images()
  per_device = functools.partial(data.augment_batch, key=jax.random.key(3), epoch=2,
                                 crop_padding=2, flip=True, mean=MEAN, std=STD)
  single = jax.jit(per_device)(images, indices)
  np.testing.assert_array_equal(on_four_devices(per_device, images, indices),
                                np.asarray(single))


def on_four_devices(per_device, images, indices) -> np.ndarray:
  """`per_device(images, indices)` under `shard_map`, the batch split over the 4 test devices."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  spec = PartitionSpec("data")
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(
      jax.device_put(images, NamedSharding(mesh, spec)),
      jax.device_put(indices, NamedSharding(mesh, spec)))
  assert len(sharded.sharding.device_set) == 4
  return np.asarray(sharded)


def test_epochs_and_keys_differ():
  images, indices = _images()
  epoch0 = _raw(images, indices, epoch=0)
  assert not np.array_equal(epoch0, _raw(images, indices, epoch=1))
  assert not np.array_equal(epoch0, _raw(images, indices, key=1))
  np.testing.assert_array_equal(epoch0, _raw(images, indices, epoch=0))


def test_eager_matches_jit_with_traced_epoch():
  images, indices = _images(8)
  for epoch in (0, 5):
    eager = data.augment_batch(images, indices, key=jax.random.key(0), epoch=epoch,
                               crop_padding=2, flip=True, mean=MEAN, std=STD)
    jitted = augment(images, indices, key=jax.random.key(0), epoch=jnp.int32(epoch),
                     crop_padding=2, flip=True, mean=MEAN, std=STD)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_flip_mirrors():
  images, indices = _images(64)
  out = _raw(images, indices, crop_padding=0, flip=True)
  same = np.all(out == images, axis=(1, 2, 3))
  mirrored = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)  # Each output is exactly one of the two.
  assert 10 < mirrored.sum() < 54  # About half are flipped.


def test_crops_are_zero_filled_shifts():
  pad = 2
  images, indices = _images(64)
  out = _raw(images, indices, crop_padding=pad, flip=False)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = []
  for example in range(len(images)):
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(out[example], padded[example, dy:dy + H, dx:dx + W])]
    assert len(matches) == 1, f"example {example} is not a shifted copy"
    offsets.append(matches[0])
  offsets = np.array(offsets)
  # Offsets span the whole range [0, 2 * pad] on both axes, the centre is not always chosen.
  assert set(offsets[:, 0]) == set(range(2 * pad + 1))
  assert set(offsets[:, 1]) == set(range(2 * pad + 1))
  shifted = np.any(offsets != pad, axis=1)
  assert np.all((out[shifted] == 0).any(axis=(1, 2, 3)))  # Zeros came in from the border.
  assert not (out[~shifted] == 0).any()
