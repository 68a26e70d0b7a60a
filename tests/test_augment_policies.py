"""Rotation, Cutout, AutoAugment and the crop's fill: PIL's semantics, per-example randomness.

The official recipes run these on PIL images (torchvision's RandomRotation, BYOT's journal
code's CIFAR10Policy and Cutout), so the operations are compared with Pillow itself on small
images; where float32 cannot reproduce Pillow's float64 exactly the test bounds the difference.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from selfkd_jax import data
from selfkd_jax.data import autoaugment as aa
from selfkd_jax.data import geometry
from selfkd_jax.data.info import DatasetInfo
from selfkd_jax.train import config_check
from selfkd_jax.train.default_config import base_config
from selfkd_jax.train.loop import _augmentation

from test_data_augment import on_four_devices

OPTIONS = ("crop_padding", "flip", "mean", "std", "crop_fill", "rotation_degrees",
           "autoaugment", "cutout")
augment = jax.jit(data.augment_batch, static_argnames=OPTIONS)
RAW = dict(mean=(0.0,) * 3, std=(1.0,) * 3)  # normalisation off: outputs are pixels / 255
OFF = dict(crop_fill=0, rotation_degrees=0.0, autoaugment="none", cutout=0)
ALL_ON = dict(crop_padding=2, flip=True, crop_fill=128, rotation_degrees=15.0,
              autoaugment="cifar10", cutout=4)
# Crop-and-flip tests share one shape and key: each option set compiles once.
CROP_SHAPE = (16, 7, 9)
CROP_FLIP = dict(crop_padding=2, flip=True, key=5, epoch=2)


def _raw(images, indices, *, key=0, epoch=0, **options):
  """augment_batch's output on the 0..255 scale (mean 0, std 1), as int."""
  options = {"crop_padding": 0, "flip": False, **RAW, **options}
  out = augment(images, indices, key=jax.random.key(key), epoch=epoch, **options)
  return np.rint(np.asarray(out) * 255).astype(np.int64)


def _images(batch, height, width, seed=0, low=1):
  rng = np.random.default_rng(seed)
  return (rng.integers(low, 256, (batch, height, width, 3), dtype=np.uint8),
          np.arange(batch) + 1000)


def _pil(image):
  return Image.fromarray(image if image.shape[-1] == 3 else image[..., 0])


def _array(pil_image, channels=3):
  out = np.asarray(pil_image).astype(np.int64)
  return out if channels == 3 else out[..., None]


# --- geometry: rotation ---

rotate = jax.jit(functools.partial(geometry.rotate, fill=0))


@pytest.mark.parametrize("side", [4, 5])  # even and odd sides: the centre convention
def test_rotation_by_right_angles_is_rot90_counterclockwise(side):
  image = np.arange(side * side * 3, dtype=np.uint8).reshape(side, side, 3)
  np.testing.assert_array_equal(rotate(image, 0.0), image)
  # Positive angles turn counterclockwise (PIL / torchvision): the top-right corner comes from
  # the bottom-right one, as np.rot90 with k=1 does on [H, W] arrays.
  np.testing.assert_array_equal(rotate(image, 90.0), np.rot90(image, 1))
  np.testing.assert_array_equal(rotate(image, -90.0), np.rot90(image, -1))
  np.testing.assert_array_equal(rotate(image, 180.0), np.rot90(image, 2))
  assert rotate(image, 90.0)[0, -1, 0] == image[-1, -1, 0]


def test_rotation_fills_corners_and_matches_pil():
  image = np.full((8, 8, 3), 200, np.uint8)
  out = np.asarray(rotate(image, 45.0))
  assert (out[0, 0] == 0).all() and (out[-1, -1] == 0).all() and (out[0, -1] == 0).all()
  assert (out[3:5, 3:5] == 200).all()
  pixels, _ = _images(1, 12, 10, seed=1)
  for degrees in (15.0, -7.3, 6.666667):
    ours = np.asarray(rotate(pixels[0], degrees)).astype(int)
    # torchvision's RandomRotation on a PIL image calls Image.rotate(angle, NEAREST, fill 0).
    theirs = _array(_pil(pixels[0]).rotate(degrees, resample=Image.NEAREST))
    assert (ours != theirs).any(-1).mean() <= 0.02, degrees  # float32 vs float64 pixel edges


def test_random_rotation_stays_within_its_range():
  images = np.full((48, 16, 16, 3), 255, np.uint8)
  raw = _raw(images, np.arange(48), rotation_degrees=15.0)
  filled = (raw == 0).all(-1).sum(axis=(1, 2))
  at_15 = (np.asarray(rotate(images[0], 15.0)) == 0).all(-1).sum()
  assert filled.max() <= at_15  # no angle beyond 15 degrees
  assert (filled == 0).any() and (filled > at_15 // 4).any()  # small and large angles occur
  assert set(np.unique(raw)) <= {0, 255}  # NEAREST: no new pixel values


# --- Cutout and the crop's fill ---


def test_cutout_blacks_out_one_clipped_square_before_normalisation():
  images, indices = _images(*CROP_SHAPE)
  height, width = CROP_SHAPE[1:]
  mean, std = np.array((0.5, 0.4, 0.3)), np.array((0.2, 0.25, 0.3))
  options = dict(CROP_FLIP, **dict(OFF, crop_fill=128))
  out = np.asarray(augment(images, indices, key=jax.random.key(options.pop("key")),
                           mean=tuple(mean), std=tuple(std), **dict(options, cutout=4)))
  # BYOT runs Cutout after ToTensor and before Normalize: the hole is black, (0 - mean) / std.
  in_hole = np.isclose(out, -mean / std, atol=1e-5).all(-1)
  # Elsewhere: the same crop (fill 128, no zeros) and flip as without Cutout.
  pixels = np.rint((out * std + mean) * 255).astype(np.int64)
  without = _raw(images, indices, **CROP_FLIP, **dict(OFF, crop_fill=128))
  np.testing.assert_array_equal(pixels[~in_hole], without[~in_hole])
  assert not (without == 0).all(-1).any()
  sides = []
  for hole in in_hole:
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    assert hole.sum() == len(rows) * len(cols)  # one rectangle
    for span, side in ((rows, height), (cols, width)):
      assert np.array_equal(span, np.arange(span[0], span[-1] + 1))
      # [c - 2, c + 2) for a centre c in 0..side-1, clipped to the image.
      centre = span[0] + 2 if span[0] > 0 else span[-1] + 1 - 2
      assert 0 <= centre < side
      assert len(span) == min(centre + 2, side) - max(centre - 2, 0)
      sides.append(len(span))
  assert set(sides) == {2, 3, 4}  # centres reach the borders and the middle


def test_crop_fill_pads_with_its_value():
  images, indices = _images(*CROP_SHAPE)
  out = _raw(images, indices, **CROP_FLIP, **dict(OFF, crop_fill=128))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=128)
  shifted = 0
  for example in range(len(images)):
    windows = [window for dy in range(5) for dx in range(5)
               for window in (padded[example, dy:dy + 7, dx:dx + 9],
                              padded[example, dy:dy + 7, dx:dx + 9][:, ::-1])]
    assert sum(np.array_equal(out[example], w) for w in windows) == 1
    shifted += (out[example] == 128).all(-1).any()
  assert shifted >= 12
  # The offsets are drawn as with fill 0 (the images have no 0): only the padding changed.
  zero_fill = _raw(images, indices, **CROP_FLIP, **OFF)
  np.testing.assert_array_equal(np.where(zero_fill == 0, 128, zero_fill), out)


# --- AutoAugment operations against Pillow ---


def _compare(op, value, image, expected):
  ours = np.asarray(jax.jit(op)(image, jnp.float32(value))).astype(int)
  np.testing.assert_array_equal(ours, expected, err_msg=f"{op.__name__}({value})")


@pytest.mark.parametrize("channels", [3, 1])
def test_pixel_operations_equal_pillow(channels):
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
  pil = _pil(image)
  factors = sorted({1 + s * m for m in aa._BINS["color"] for s in (1, -1)})
  enhancers = {aa.color: ImageEnhance.Color, aa.contrast: ImageEnhance.Contrast,
               aa.brightness: ImageEnhance.Brightness, aa.sharpness: ImageEnhance.Sharpness}
  for op, enhancer in enhancers.items():
    jitted = jax.jit(op)  # one compile, the factor traced
    for factor in factors:
      np.testing.assert_array_equal(np.asarray(jitted(image, np.float32(factor))),
                                    _array(enhancer(pil).enhance(factor), channels),
                                    err_msg=f"{op.__name__}({factor})")
  for bits in (4, 5, 6, 7, 8):
    _compare(aa.posterize, bits, image, _array(ImageOps.posterize(pil, bits), channels))
  for threshold in aa._BINS["solarize"]:
    _compare(aa.solarize, aa.operation_value("solarize", threshold, 1, 9, 11), image,
             _array(ImageOps.solarize(pil, threshold), channels))
  _compare(aa.invert, 0, image, _array(ImageOps.invert(pil), channels))
  _compare(aa.equalize, 0, image, _array(ImageOps.equalize(pil), channels))
  _compare(aa.equalize, 0, image // 50, _array(ImageOps.equalize(_pil(image // 50)), channels))
  # AutoContrast: exact (v - lo) * 255 // (hi - lo) per channel; Pillow's float64 is one lower
  # where that division is exact and its rounding lands below the integer (documented).
  narrow = (image // 3 + 40).astype(np.int64)
  lo, hi = narrow.min(axis=(0, 1)), narrow.max(axis=(0, 1))
  exact = (narrow - lo) * 255 // (hi - lo)
  _compare(aa.autocontrast, 0, narrow.astype(np.uint8), exact)
  pillow = _array(ImageOps.autocontrast(_pil(narrow.astype(np.uint8))), channels)
  on_integer = (narrow - lo) * 255 % (hi - lo) == 0
  assert np.all((exact == pillow) | (on_integer & (exact == pillow + 1)))


def test_equalize_and_autocontrast_edge_cases():
  flat = np.full((6, 6, 3), 77, np.uint8)
  np.testing.assert_array_equal(jax.jit(aa.equalize)(flat), flat)  # one level: left alone
  np.testing.assert_array_equal(jax.jit(aa.autocontrast)(flat), flat)
  # Pillow's float64 int(v * 255/25) gives 254 for v = 25: exact arithmetic gives 255.
  ramp = np.arange(26, dtype=np.uint8).repeat(3).reshape(1, 26, 3)
  pillow = _array(ImageOps.autocontrast(_pil(ramp)))
  ours = np.asarray(jax.jit(aa.autocontrast)(ramp)).astype(int)
  np.testing.assert_array_equal(ours[0, :, 0], np.arange(26) * 255 // 25)
  assert pillow[0, -1, 0] == 254 and ours[0, -1, 0] == 255
  assert np.all((ours == pillow) | (ours == pillow + 1))


def test_translations_equal_pillow_and_shears_are_close():
  image, _ = _images(1, 10, 12, seed=3, low=0)
  image, pil = image[0], _pil(image[0])
  grey = (128,) * 3
  for m in (aa._BINS["translateX"][3], aa._BINS["translateX"][9]):
    for sign in (1, -1):
      pixels_x = aa.operation_value("translateX", m, sign, 10, 12)
      pixels_y = aa.operation_value("translateY", m, sign, 10, 12)
      _compare(aa.translate_x, pixels_x, image,
               _array(pil.transform(pil.size, Image.AFFINE, (1, 0, pixels_x, 0, 1, 0),
                                    fillcolor=grey)))
      _compare(aa.translate_y, pixels_y, image,
               _array(pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, pixels_y),
                                    fillcolor=grey)))
  for op, matrix in ((aa.shear_x, lambda s: (1, s, 0, 0, 1, 0)),
                     (aa.shear_y, lambda s: (1, 0, 0, s, 1, 0))):
    jitted = jax.jit(op)
    for shear in (0.3, -0.2667, 0.1):
      ours = np.asarray(jitted(image, np.float32(shear))).astype(int)
      theirs = _array(pil.transform(pil.size, Image.AFFINE, matrix(shear), Image.BICUBIC,
                                    fillcolor=grey))
      # PIL's bicubic (a = -1, truncated): float32 vs float64 moves rare values by one level,
      # or a pixel on the fill boundary between grey and the edge.
      assert (ours != theirs).any(-1).mean() < 0.02, (op.__name__, shear)
      near = (np.abs(ours - theirs) <= 1).all(-1)
      on_fill_boundary = (ours == 128).all(-1) | (theirs == 128).all(-1)
      assert (near | on_fill_boundary).all(), (op.__name__, shear)
  rotated = pil.convert("RGBA").rotate(6.666667)
  grey_rotated = Image.composite(rotated, Image.new("RGBA", rotated.size, (128,) * 4), rotated)
  ours = np.asarray(jax.jit(aa.rotate)(image, np.float32(6.666667))).astype(int)
  assert (ours != _array(grey_rotated.convert("RGB"))).any(-1).mean() <= 0.02


def test_policy_table_is_the_cifar10_policy():
  policy = aa.POLICIES["cifar10"]
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  assert policy[0] == ((0.1, "invert", 7), (0.2, "contrast", 6))
  assert policy[-1] == ((0.7, "translateY", 9), (0.9, "autocontrast", 1))
  assert sum(op == "equalize" for sub in policy for _, op, _ in sub) == 9
  assert "shearX" not in {op for sub in policy for _, op, _ in sub}  # only shearY is used
  # The bins the policy reaches, as PIL receives them for a 32 x 32 image.
  value = functools.partial(aa.operation_value, height=32, width=32)
  assert value("translateX", aa._BINS["translateX"][9], -1) == pytest.approx(-150 / 331 * 32)
  assert value("rotate", aa._BINS["rotate"][2], -1) == pytest.approx(20 / 3)  # no sign
  assert value("posterize", aa._BINS["posterize"][7], 1) == 5
  assert value("solarize", aa._BINS["solarize"][2], 1) == 200  # x < 199.1 <=> x < 200
  assert value("brightness", aa._BINS["brightness"][9], -1) == pytest.approx(0.1)
  assert value("shearY", aa._BINS["shearY"][8], -1) == pytest.approx(-0.8 / 3)


@pytest.fixture
def one_policy(monkeypatch):
  def install(*sub_policies):
    monkeypatch.setitem(aa.POLICIES, "test", sub_policies)
    return jax.jit(jax.vmap(
        lambda image, key: aa.apply_policy(image, jax.random.uniform(key, (5,)), "test")))
  return install


def test_policy_choice_probabilities_and_signs(one_policy):
  images, _ = _images(128, 6, 8, seed=4)
  keys = jax.random.split(jax.random.key(0), 128)
  # Sub-policy 1 inverts always (p = 1, second stage) and again with p = 0.5 (first stage);
  # sub-policy 2 translates by 150/331 of 8 = 3.625 px with a random sign, then never (p = 0)
  # inverts. NEAREST reads the pixel containing x + 0.5 + t: either sign moves 4 columns.
  out = np.asarray(one_policy(((0.5, "invert", 0), (1.0, "invert", 0)),
                              ((1.0, "translateX", 9), (0.0, "invert", 0)))(images, keys))

  def same(a, b):
    return (a == b).all(axis=(1, 2, 3))

  outcomes = np.stack([
      same(out, 255 - images), same(out, images),  # sub-policy 1: first stage skipped / applied
      same(out[:, :, :4], images[:, :, 4:]) & same(out[:, :, 4:], 128),  # moved left
      same(out[:, :, 4:], images[:, :, :4]) & same(out[:, :, :4], 128),  # moved right
  ])
  assert np.all(outcomes.sum(0) == 1)  # each output is exactly one of them
  assert np.all((16 < outcomes.sum(1)) & (outcomes.sum(1) < 48))  # each about 1/4


# --- the batch: determinism, batch position, all-off, config ---


def test_new_augmentations_belong_to_the_example():
  images, indices = _images(32, 10, 10)  # the shapes of the cross-device test: one compile
  full = _raw(images, indices, epoch=3, **ALL_ON)
  np.testing.assert_array_equal(_raw(images, indices, epoch=3, **ALL_ON), full)
  order = np.random.default_rng(1).permutation(len(images))
  np.testing.assert_array_equal(_raw(images[order], indices[order], epoch=3, **ALL_ON),
                                full[order])
  # Another index or epoch draws another augmentation (for nearly every example).
  other_index = _raw(images, indices + 1, epoch=3, **ALL_ON)
  assert (other_index != full).any(axis=(1, 2, 3)).mean() > 0.7
  assert (_raw(images, indices, epoch=4, **ALL_ON) != full).any(axis=(1, 2, 3)).mean() > 0.7


def test_all_off_is_the_crop_and_flip_of_before_bit_for_bit():
  images, indices = _images(*CROP_SHAPE)

  def before(image, example_key):  # the crop-and-flip step these options were added to
    crop_key, flip_key = jax.random.split(example_key)
    padded = jnp.pad(image, ((2, 2), (2, 2), (0, 0)))
    offsets = jax.random.randint(crop_key, (2,), 0, 5)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape)
    return jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)

  epoch_key = jax.random.fold_in(jax.random.key(CROP_FLIP["key"]), CROP_FLIP["epoch"])
  keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(indices)
  expected = np.asarray(jax.jit(jax.vmap(before))(images, keys)).astype(np.int64)
  # As the train step passes them: every new option explicit, and off.
  out = _raw(images, indices, **CROP_FLIP, **OFF)
  np.testing.assert_array_equal(out, expected)


@pytest.mark.cross_device
def test_one_and_four_devices_agree_with_every_augmentation():
  images, indices = _images(32, 10, 10)
  per_device = functools.partial(data.augment_batch, key=jax.random.key(3), epoch=2, **RAW,
                                 **ALL_ON)
  single = augment(images, indices, key=jax.random.key(3), epoch=2, **RAW, **ALL_ON)
  np.testing.assert_array_equal(on_four_devices(per_device, images, indices), np.asarray(single))


def _info(channels=3):
  return DatasetInfo(name="x", num_classes=10, num_train=100, num_test=10,
                     image_shape=(32, 32, channels), mean=(0.5,) * channels,
                     std=(0.25,) * channels, flip=True, crop_padding=4)


@pytest.mark.parametrize("key,value,words", [
    ("crop_fill", 256, "0..255"), ("crop_fill", -1, "0..255"), ("crop_fill", 1.5, "0..255"),
    ("rotation_degrees", -5.0, "[0, 180]"), ("rotation_degrees", 200, "[0, 180]"),
    ("rotation_degrees", float("nan"), "[0, 180]"), ("autoaugment", "imagenet", "none, cifar10"),
    ("cutout", -1, "0..32"), ("cutout", 33, "0..32"), ("cutout", 8.0, "0..32"),
])
def test_config_refuses_bad_values(key, value, words):
  config = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
  config.batch_size = 10
  config.data[key] = value
  with pytest.raises(config_check.ConfigError, match=f"config.data.{key}") as error:
    config_check.check_against_dataset(config, _info())
  assert words in str(error.value) and "\n" not in str(error.value)


def test_config_defaults_are_off_and_augment_false_turns_all_off():
  config = base_config()
  config.batch_size = 10
  config_check.check_against_dataset(config, _info())
  assert _augmentation(config.data, _info()) == _augmentation(
      ml_collections.ConfigDict({"augment": True, "crop_padding": -1, "flip": -1}), _info())
  config.data.update(crop_fill=128, rotation_degrees=15.0, autoaugment="cifar10", cutout=16)
  config_check.check_against_dataset(config, _info())
  on = _augmentation(config.data, _info())
  assert (on.crop_fill, on.rotation_degrees, on.autoaugment, on.cutout) == (
      128, 15.0, "cifar10", 16)
  config.data.augment = False
  off = _augmentation(config.data, _info())
  assert (off.crop_padding, off.flip, off.rotation_degrees, off.autoaugment, off.cutout) == (
      0, False, 0.0, "none", 0)
  with pytest.raises(config_check.ConfigError, match="1- or 3-channel"):
    config.data.augment = True
    config_check.check_against_dataset(config, _info(channels=2))


def test_workdirs_written_before_these_keys_resume():
  current = json.loads(base_config().to_json())
  old = json.loads(base_config().to_json())
  for key in ("crop_fill", "rotation_degrees", "autoaugment", "cutout"):
    del old["data"][key]
  assert config_check.comparable(old) == config_check.comparable(current)
  current["data"]["autoaugment"] = "cifar10"
  assert config_check.comparable(old) != config_check.comparable(current)
