"""Affine resampling of one uint8 image [H, W, C] with PIL's conventions, in JAX.

The official PyTorch recipes transform PIL images, so these functions follow PIL's
`Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor)`:

* the six numbers map an *output* point to the *input* point it is read from,
  `x_in = a x + b y + c`, `y_in = d x + e y + f`, evaluated at the output pixel's centre
  `(x + 0.5, y + 0.5)`, in a frame whose pixel `i` covers `[i, i + 1)`;
* an output pixel whose input point lies outside `[0, W) x [0, H)` gets `fill`;
* NEAREST reads the pixel that contains the input point (`floor`);
* BICUBIC (here only for shears, `shear`) is PIL's cubic convolution with a = -1 (not
  Catmull-Rom's -0.5), edge pixels repeated for neighbours beyond the border, and the result
  truncated (not rounded) to uint8.

Arithmetic is float32 where PIL uses float64. NEAREST differs from PIL only where an input
point falls within ~1e-6 of a pixel edge (about 1 pixel in 10^4 for random angles). BICUBIC
differs more: where the exact value is an integer (a sample on a pixel centre, frequent with
AutoAugment's rational shears), PIL's float64 and our float32 truncate it to that integer or
one below depending on their rounding, not always alike, and a point exactly on the image edge
can be grey fill in one and the edge pixel in the other. Measured on random 32 x 32 RGB images
over the policy's shears: 0.4% of pixels one level apart, 0.005% fill vs edge.
"""
import math

import jax
import jax.numpy as jnp


def affine_transform(image: jax.Array, matrix, *, fill) -> jax.Array:
  """Resamples uint8 `image` [H, W, C] through PIL's affine `matrix` (a, b, c, d, e, f), NEAREST.

  `matrix` may be traced (six floats); `fill` is a scalar or per-channel uint8 value for points
  read from outside the image.
  """
  height, width, _ = image.shape
  a, b, c, d, e, f = (jnp.asarray(matrix[i], jnp.float32) for i in range(6))
  x = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
  y = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
  x_in = (exact_times(a, x) + exact_times(b, y)) + c  # [H, W]
  y_in = (exact_times(d, x) + exact_times(e, y)) + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  rows = jnp.clip(jnp.floor(y_in), 0, height - 1).astype(jnp.int32)
  cols = jnp.clip(jnp.floor(x_in), 0, width - 1).astype(jnp.int32)
  return _fill_outside(image[rows, cols], inside, fill)


def shear(image: jax.Array, factor, *, axis: int, fill) -> jax.Array:
  """PIL's BICUBIC shear of uint8 `image` [H, W, C]: axis 1 is `transform(AFFINE,
  (1, factor, 0, 0, 1, 0))` (row y reads x + factor (y + 0.5)), axis 0 is `(1, 0, 0, factor,
  1, 0)` (column x reads y + factor (x + 0.5)).

  The other coordinate is read at a pixel centre, where PIL's 2-D kernel weighs the rows
  (0, 1, 0, 0): the 1-D cubic along `axis` is the same computation, a quarter of the work.
  """
  if axis == 0:
    return jnp.swapaxes(shear(jnp.swapaxes(image, 0, 1), factor, axis=1, fill=fill), 0, 1)
  height, width, _ = image.shape
  x = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
  y = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
  x_in = x + exact_times(factor, y)  # [H, W]
  inside = (x_in >= 0) & (x_in < width)
  # Pixel centres sit at i + 0.5: shift to index space, then take 4 neighbours in the row.
  x_index = x_in - 0.5
  x0 = jnp.floor(x_index)
  weights = _cubic_weights(x_index - x0)  # [H, W, 4]
  cols = jnp.clip(x0.astype(jnp.int32)[..., None] + jnp.arange(-1, 3), 0, width - 1)
  neighbours = image[jnp.arange(height)[:, None, None], cols].astype(jnp.float32)  # [H,W,4,C]
  value = jnp.einsum("hwk,hwkc->hwc", weights, neighbours)
  return _fill_outside(jnp.clip(jnp.floor(value), 0, 255).astype(image.dtype), inside, fill)


def _fill_outside(values: jax.Array, inside: jax.Array, fill) -> jax.Array:
  fill = jnp.broadcast_to(jnp.asarray(fill, values.dtype), values.shape[-1:])
  return jnp.where(inside[..., None], values, fill)


def exact_times(value, small):
  """float32 `value * small` for `small` with at most 12 significant bits (pixel coordinates,
  half sides, integer differences up to 255), rounded once, whether or not the compiler fuses
  the product into the next addition (FMA: one rounding for both, and XLA decides per program,
  so results could depend on the batch size or device count): `value` is split into two halves
  of 12 significant bits, whose products with `small` are exact."""
  value = jnp.asarray(value, jnp.float32)
  bits = jax.lax.bitcast_convert_type(value, jnp.int32)
  high = jax.lax.bitcast_convert_type(bits & jnp.int32(-4096), jnp.float32)
  return high * small + (value - high) * small


def _cubic_weights(t: jax.Array) -> jax.Array:
  """Weights [..., 4] of the neighbours at offsets -1, 0, 1, 2 for a fraction `t` in [0, 1)."""
  a = -1.0  # PIL's kernel (libImaging/Geometry.c), sharper than Catmull-Rom
  distance = jnp.stack([1 + t, t, 1 - t, 2 - t], axis=-1)
  near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
  far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
  return jnp.where(distance <= 1, near, far)


def rotation_matrix(degrees, height: int, width: int) -> tuple:
  """PIL's `Image.rotate(degrees)` as an affine matrix: counterclockwise for positive degrees,
  about the image centre `(W / 2, H / 2)` in PIL's frame (between the two middle pixels of an
  even side, on the middle pixel of an odd one), same output size."""
  radians = -jnp.asarray(degrees, jnp.float32) * (math.pi / 180.0)
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  cx, cy = width / 2.0, height / 2.0
  return (cos, sin, cx - (exact_times(cos, cx) + exact_times(sin, cy)), -sin, cos,
          cy + (exact_times(sin, cx) - exact_times(cos, cy)))


def rotate(image: jax.Array, degrees, *, fill) -> jax.Array:
  """`image` [H, W, C] rotated by `degrees` counterclockwise, as PIL's `Image.rotate` (and so
  torchvision's `RandomRotation` on PIL images): NEAREST, corners filled with `fill`."""
  height, width, _ = image.shape
  return affine_transform(image, rotation_matrix(degrees, height, width), fill=fill)
