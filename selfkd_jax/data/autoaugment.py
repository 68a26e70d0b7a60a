"""AutoAugment's CIFAR-10 policy on device, with PIL's pixel semantics.

BYOT's journal code (ArchipLab-LinfengZhang/pytorch-self-distillation-final, `train.py` and
`autoaugment.py`) trains CIFAR-100 with `CIFAR10Policy()`: the 25 sub-policies of Cubuk et al.
(2019), magnitudes on 10 bins, grey (128) fill, applied to PIL images after the random crop and
flip. Each call picks one sub-policy uniformly and applies each of its two operations with its
probability; shear, translate and the enhancements get a random sign (rotation does not: that
policy only ever rotates counterclockwise).

Every operation here is a pure function `(image uint8 [H, W, C], value) -> image` with the
semantics of PIL's `ImageOps` / `ImageEnhance` / `Image.transform`:

* exact (bit for bit with Pillow): Posterize, Solarize, Invert, Equalize, Color, Brightness,
  Contrast, Sharpness, TranslateX/Y (NEAREST), Rotate up to `geometry`'s float32 caveat;
* ShearX/Y use PIL's BICUBIC (`geometry.shear`) in float32 where Pillow uses float64: 0.4% of
  the pixels of a sheared image come out one level apart, 0.005% grey fill vs edge pixel;
* AutoContrast maps `v -> floor((v - lo) * 255 / (hi - lo))` exactly. Pillow evaluates
  `int(v * scale + offset)` in float64, which lands just below the integer for some exact
  integer results (0.14% of all (lo, hi, v) triples, e.g. lo=0, hi=25, v=25 gives 254, not
  255); there this module is one level higher than Pillow.

Images with 1 channel are treated as PIL mode "L" (Color is then the identity), 3 as "RGB".
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from selfkd_jax.data import geometry

FILL = 128  # the policy's fillcolor (128, 128, 128) for shear, translate and rotate

# Magnitude bins 0..9 of each operation (the policy's `ranges`).
_BINS = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),  # a fraction of the image side
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),  # degrees
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10)),  # bits kept
    "solarize": np.linspace(256, 0, 10),  # threshold
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": np.zeros(10),
    "equalize": np.zeros(10),
    "invert": np.zeros(10),
}
OPERATIONS = tuple(_BINS)

# (probability, operation, magnitude bin) twice per sub-policy: the CIFAR-10 policy.
CIFAR10_POLICY = (
    ((0.1, "invert", 7), (0.2, "contrast", 6)),
    ((0.7, "rotate", 2), (0.3, "translateX", 9)),
    ((0.8, "sharpness", 1), (0.9, "sharpness", 3)),
    ((0.5, "shearY", 8), (0.7, "translateY", 9)),
    ((0.5, "autocontrast", 8), (0.9, "equalize", 2)),
    ((0.2, "shearY", 7), (0.3, "posterize", 7)),
    ((0.4, "color", 3), (0.6, "brightness", 7)),
    ((0.3, "sharpness", 9), (0.7, "brightness", 9)),
    ((0.6, "equalize", 5), (0.5, "equalize", 1)),
    ((0.6, "contrast", 7), (0.6, "sharpness", 5)),
    ((0.7, "color", 7), (0.5, "translateX", 8)),
    ((0.3, "equalize", 7), (0.4, "autocontrast", 8)),
    ((0.4, "translateY", 3), (0.2, "sharpness", 6)),
    ((0.9, "brightness", 6), (0.2, "color", 8)),
    ((0.5, "solarize", 2), (0.0, "invert", 3)),
    ((0.2, "equalize", 0), (0.6, "autocontrast", 0)),
    ((0.2, "equalize", 8), (0.6, "equalize", 4)),
    ((0.9, "color", 9), (0.6, "equalize", 6)),
    ((0.8, "autocontrast", 4), (0.2, "solarize", 8)),
    ((0.1, "brightness", 3), (0.7, "color", 0)),
    ((0.4, "solarize", 5), (0.9, "autocontrast", 3)),
    ((0.9, "translateY", 9), (0.7, "translateY", 9)),
    ((0.9, "autocontrast", 2), (0.8, "solarize", 3)),
    ((0.8, "equalize", 8), (0.1, "invert", 3)),
    ((0.7, "translateY", 9), (0.9, "autocontrast", 1)),
)
POLICIES = {"cifar10": CIFAR10_POLICY}


def operation_value(operation: str, magnitude: float, sign: int, height: int, width: int):
  """The argument the PIL code passes for `operation` at `magnitude` with random `sign` (+-1),
  computed in float64 as the policy does: shear factor, translation in pixels, degrees,
  enhancement factor, bits, or an integer threshold."""
  if operation in ("shearX", "shearY"):
    return magnitude * sign
  if operation == "translateX":
    return magnitude * width * sign
  if operation == "translateY":
    return magnitude * height * sign
  if operation in ("color", "contrast", "sharpness", "brightness"):
    return 1 + magnitude * sign
  if operation == "solarize":
    return float(np.ceil(magnitude))  # for an integer pixel, x < t  <=>  x < ceil(t)
  return float(magnitude)  # rotate (no sign), posterize bits, and ops without magnitude


# --- the operations, by what they compute: an affine map, a shear, a blend or a lookup table ---
# Each operation is a pure function (uint8 image [H, W, C], float32 value) -> uint8 image, built
# from its group's parameter (matrix, degenerate image, table) and the group's one resampler,
# blend or lookup. `apply_policy` selects the parameter per example and runs each group once.


def _translate_x_matrix(pixels, height, width):
  del height, width
  return (1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def _translate_y_matrix(pixels, height, width):
  del height, width
  return (1.0, 0.0, 0.0, 0.0, 1.0, pixels)


MATRICES = {"translateX": _translate_x_matrix, "translateY": _translate_y_matrix,
            "rotate": geometry.rotation_matrix}  # NEAREST, as PIL's transform / rotate default
SHEAR_AXES = {"shearX": 1, "shearY": 0}  # BICUBIC


def _luma(image):
  """PIL's RGB -> L conversion, `(19595 R + 38470 G + 7471 B + 2^15) >> 16`, as int32 [H, W]."""
  pixels = jnp.asarray(image).astype(jnp.int32)
  if image.shape[-1] == 1:
    return pixels[..., 0]
  if image.shape[-1] != 3:
    raise ValueError(f"autoaugment needs 1 or 3 channels, got {image.shape[-1]}")
  r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
  return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _grey(image):
  """Color's degenerate: the L image back in the image's mode (an "L" image is its own)."""
  return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def _mean_grey(image):
  """Contrast's degenerate: the L image's mean, int(mean + 0.5), everywhere."""
  luma = _luma(image)
  count = luma.size
  return jnp.full(image.shape, (2 * jnp.sum(luma) + count) // (2 * count), jnp.int32)


def _black(image):
  return jnp.zeros(image.shape, jnp.int32)


def _smooth(image):
  """Sharpness's degenerate: PIL's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13, rounded); its
  one-pixel border is the original's, as in PIL's 3x3 filter."""
  pixels = jnp.asarray(image).astype(jnp.int32)
  height, width, _ = image.shape
  window = sum(pixels[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3)
               for dx in range(3))
  weighted = window + 4 * pixels[1:-1, 1:-1]
  return pixels.at[1:-1, 1:-1].set((2 * weighted + 13) // 26)  # round(weighted / 13)


DEGENERATES = {"color": _grey, "contrast": _mean_grey, "brightness": _black,
               "sharpness": _smooth}


def blend(degenerate, image, factor):
  """PIL's `Image.blend(degenerate, image, factor)`: float32 `d + factor * (x - d)` with C's two
  roundings (also under XLA's FMA fusion, see `geometry.exact_times`), truncated and clipped
  to 0..255: the core of every `ImageEnhance` class."""
  d = jnp.asarray(degenerate, jnp.int32).astype(jnp.float32)
  mixed = d + geometry.exact_times(factor, jnp.asarray(image).astype(jnp.float32) - d)
  return jnp.clip(jnp.floor(mixed), 0, 255).astype(jnp.uint8)


def _levels():
  return jnp.arange(256, dtype=jnp.int32)  # made when traced: importing this starts no backend


def _posterize_table(image, bits):
  levels = _levels()
  bits = jnp.clip(jnp.asarray(bits).astype(jnp.int32), 1, 8)
  return jnp.broadcast_to(levels & (256 - jnp.left_shift(1, 8 - bits)), (image.shape[-1], 256))


def _solarize_table(image, threshold):
  levels = _levels()
  threshold = jnp.asarray(threshold).astype(jnp.int32)  # an integer: see `operation_value`
  table = jnp.where(levels < threshold, levels, 255 - levels)
  return jnp.broadcast_to(table, (image.shape[-1], 256))


def _invert_table(image, _value):
  levels = _levels()
  return jnp.broadcast_to(255 - levels, (image.shape[-1], 256))


def _autocontrast_table(image, _value):
  """Per channel, [lo, hi] -> [0, 255] by floor((v - lo) * 255 / (hi - lo)); flat: identity."""
  levels = _levels()
  pixels = jnp.asarray(image).astype(jnp.int32)
  lo = jnp.min(pixels, axis=(0, 1))[:, None]
  hi = jnp.max(pixels, axis=(0, 1))[:, None]
  stretched = jnp.clip((levels - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, stretched, levels)


def _equalize_table(image, _value):
  """Per channel, lut[i] = (step // 2 + #pixels below i) // step with step = (#pixels not at
  the highest level present) // 255 (clipped to 255); step 0 (one level): identity."""
  levels = _levels()
  pixels = jnp.asarray(image).astype(jnp.int32)
  height, width, channels = image.shape
  bins = (pixels + 256 * jnp.arange(channels)).reshape(-1)  # channel c counts in row c
  histogram = jnp.zeros(channels * 256, jnp.int32).at[bins].add(1).reshape(channels, 256)
  last = 255 - jnp.argmax(histogram[:, ::-1] > 0, axis=1)  # the highest level present
  top = jnp.take_along_axis(histogram, last[:, None], axis=1)
  step = (height * width - top) // 255
  below = jnp.cumsum(histogram, axis=1) - histogram
  table = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
  return jnp.where(step > 0, table, levels)


TABLES = {"posterize": _posterize_table, "solarize": _solarize_table, "invert": _invert_table,
          "autocontrast": _autocontrast_table, "equalize": _equalize_table}


def apply_table(image, table):
  """`table[c, image[..., c]]`: per-channel lookup, as PIL's `Image.point` with 256 entries per
  band."""
  return table[jnp.arange(image.shape[-1]), jnp.asarray(image).astype(jnp.int32)].astype(
      jnp.uint8)


def _operation(name):
  """The operation `name` on its own: (image, value) -> image."""
  if name in MATRICES:
    return lambda image, value: geometry.affine_transform(
        image, MATRICES[name](value, *image.shape[:2]), fill=FILL)
  if name in SHEAR_AXES:
    return lambda image, value: geometry.shear(image, value, axis=SHEAR_AXES[name], fill=FILL)
  if name in DEGENERATES:
    return lambda image, value: blend(DEGENERATES[name](image), image, value)
  return lambda image, value=0.0: apply_table(image, TABLES[name](image, value))


FUNCTIONS = {name: _operation(name) for name in OPERATIONS}
(shear_x, shear_y, translate_x, translate_y, rotate, color, posterize, solarize, contrast,
 sharpness, brightness, autocontrast, equalize, invert) = (FUNCTIONS[n] for n in OPERATIONS)


def _stage_tables(policy: Sequence, stage: int, height: int, width: int):
  """Static tables of one stage of every sub-policy: its operation, probability, and the
  operation's value for sign +1 and -1."""
  operation = [sub[stage][1] for sub in policy]
  probability = np.array([sub[stage][0] for sub in policy], np.float32)
  values = np.array([[operation_value(op, _BINS[op][level], sign, height, width)
                      for sign in (1, -1)] for _, op, level in (sub[stage] for sub in policy)],
                    np.float32)
  return operation, probability, values


def _run_stage(image, operation, choice, value):
  """Every operation of `operation` (names per sub-policy) that `choice` (a sub-policy index)
  can pick, each group computed once with the chosen parameter; returns the chosen result."""
  height, width, _ = image.shape
  used = sorted(set(operation), key=OPERATIONS.index)
  outputs, output_of = [], {}

  def position(group):  # the chosen operation's position in `group`, per sub-policy
    return jnp.asarray([group.index(op) if op in group else 0 for op in operation])[choice]

  matrices = [op for op in used if op in MATRICES]
  if matrices:
    matrix = jnp.stack([jnp.stack([jnp.asarray(m, jnp.float32)
                                   for m in MATRICES[op](value, height, width)])
                        for op in matrices])[position(matrices)]
    output_of.update({op: len(outputs) for op in matrices})
    outputs.append(geometry.affine_transform(image, matrix, fill=FILL))
  for op in (op for op in used if op in SHEAR_AXES):
    output_of[op] = len(outputs)
    outputs.append(geometry.shear(image, value, axis=SHEAR_AXES[op], fill=FILL))
  blends = [op for op in used if op in DEGENERATES]
  if blends:
    degenerate = jnp.stack([DEGENERATES[op](image) for op in blends])[position(blends)]
    output_of.update({op: len(outputs) for op in blends})
    outputs.append(blend(degenerate, image, value))
  tables = [op for op in used if op in TABLES]
  if tables:
    table = jnp.stack([TABLES[op](image, value) for op in tables])[position(tables)]
    output_of.update({op: len(outputs) for op in tables})
    outputs.append(apply_table(image, table))
  which = jnp.asarray([output_of[op] for op in operation])[choice]
  return jnp.stack(outputs)[which] if len(outputs) > 1 else outputs[0]


def apply_policy(image: jax.Array, uniforms: jax.Array, policy: str = "cifar10") -> jax.Array:
  """One AutoAugment draw for uint8 `image` [H, W, C]: a sub-policy chosen uniformly, then each
  of its two operations applied with its probability (and a random sign where it has one).

  `uniforms`: 5 numbers uniform in [0, 1) (the sub-policy, then apply and sign for each stage).
  One compiled program serves every choice: under vmap each group of operations runs once per
  stage, with the parameters each example chose.
  """
  table = POLICIES[policy]
  height, width, _ = image.shape
  uniform = jnp.asarray(uniforms, jnp.float32)
  choice = jnp.minimum((uniform[0] * len(table)).astype(jnp.int32), len(table) - 1)
  for stage in range(2):
    operation, probability, values = _stage_tables(table, stage, height, width)
    applied = uniform[1 + 2 * stage] < jnp.asarray(probability)[choice]
    negative = (uniform[2 + 2 * stage] < 0.5).astype(jnp.int32)
    changed = _run_stage(image, operation, choice, jnp.asarray(values)[choice, negative])
    image = jnp.where(applied, changed, image)
  return image
