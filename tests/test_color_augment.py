"""Colour jitter and lighting (PS-KD's ImageNet recipe) against numpy written from the formulas
of its `custom_transform.py`, their randomness per example, and the off path unchanged."""

import functools
import itertools

import jax
import numpy as np
import pytest

from selfkd_jax import data
from selfkd_jax.data import color
from selfkd_jax.train import config_check
from selfkd_jax.train.default_config import base_config

from test_data_augment import on_four_devices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _grey(x):
  return 0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def numpy_jitter(x, order, alphas):
  """torch `img.lerp(target, a)` = img + a * (target - img), in `order`."""
  x = x.astype(np.float64)
  for which in order:
    a = alphas[which]
    target = (0.0, _grey(x).mean(), _grey(x))[which]
    x = x + a * (target - x)
  return x


def _image(seed=0, shape=(5, 4, 3)):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_jitter_in_every_order_matches_the_formulas(order):
  image, alphas = _image(), np.array([0.3, -0.25, 0.4], np.float32)
  ours = jax.jit(color.color_jitter)(image, np.array(order), alphas)
  np.testing.assert_allclose(ours, numpy_jitter(image, order, alphas), rtol=1e-5, atol=1e-6)
  # Each transform moves the image by its own strength: a strength of 0 changes nothing, so
  # every alpha reaches its own transform whatever the order.
  for which in range(3):
    only = np.zeros(3, np.float32)
    only[which] = alphas[which]
    np.testing.assert_allclose(color.color_jitter(image, np.array(order), only),
                               numpy_jitter(image, (which,), only), rtol=1e-5, atol=1e-6)


def test_lighting_adds_the_pca_shift_to_every_pixel():
  image, alpha = _image(1), np.array([0.05, -0.1, 0.2], np.float32)
  shift = np.array([sum(color.IMAGENET_EIGVEC[i, j] * alpha[j] * color.IMAGENET_EIGVAL[j]
                        for j in range(3)) for i in range(3)])
  np.testing.assert_allclose(color.lighting(image, alpha), image + shift, rtol=1e-6, atol=1e-7)


def test_draws_per_example_and_the_off_path_unchanged():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
  indices = np.arange(100, 108)
  augment = jax.jit(functools.partial(data.augment_batch, key=jax.random.key(5), epoch=1,
                                      crop_padding=0, flip=False, mean=MEAN, std=STD,
                                      color_jitter=0.4, lighting=0.1))
  plain = np.asarray(data.augment_batch(images, indices, key=jax.random.key(5), epoch=1,
                                        crop_padding=0, flip=False, mean=MEAN, std=STD))
  np.testing.assert_array_equal(plain, data.normalize(images, MEAN, STD))  # off: as before
  out = np.asarray(augment(images, indices))
  assert not np.allclose(out, plain, atol=1e-3)
  # Each example's colour comes from its index: the same in another batch slot or batch.
  order = rng.permutation(8)
  np.testing.assert_allclose(np.asarray(augment(images[order], indices[order])), out[order],
                             rtol=1e-6, atol=1e-6)
  # What was applied is a jitter of strength <= 0.4 then a lighting shift: undo normalising and
  # the largest change per image stays within what those can do to [0, 1] pixels.
  restored = out * np.array(STD) + np.array(MEAN)
  assert np.abs(restored - images / 255.0).max() < 1.5


@pytest.mark.cross_device
def test_one_and_four_devices_agree_with_colour():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
  indices = np.arange(8)
  per_device = functools.partial(data.augment_batch, key=jax.random.key(3), epoch=0,
                                 crop_padding=1, flip=True, mean=MEAN, std=STD,
                                 color_jitter=0.4, lighting=0.1)
  np.testing.assert_allclose(on_four_devices(per_device, images, indices),
                             np.asarray(jax.jit(per_device)(images, indices)),
                             rtol=1e-6, atol=1e-6)


def test_bad_values_are_one_line():
  from selfkd_jax.data.info import DatasetInfo  # pylint: disable=g-import-not-at-top
  info = DatasetInfo(name="x", num_classes=10, image_shape=(28, 28, 1), num_train=1000,
                     num_test=10, mean=(0.5,), std=(0.2,), flip=False, crop_padding=0)
  for key, value, message in (("color_jitter", 1.5, "must be a number in \\[0, 1\\]"),
                              ("lighting", -0.1, "must be a number in \\[0, 1\\]"),
                              ("lighting", 0.1, "needs RGB images, the dataset has 1")):
    config = base_config()
    config.data[key] = value
    with pytest.raises(config_check.ConfigError, match=f"config.data.{key}={value}.* {message}"):
      config_check.check_against_dataset(config, info)
