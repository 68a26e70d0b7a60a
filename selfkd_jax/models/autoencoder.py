"""ReffAKD's convolutional autoencoder, whose encoder embeds images for the class similarity.

Not a classifier: it is not in `models.registry` and returns `(reconstruction, embedding)`
instead of the classifier output dict. `selfkd_jax.reffakd` trains it and builds the
similarity artifact from it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfkd_jax.models import common

# Every layer halves (encoder) or doubles (decoder) the spatial size: 4×4 kernels, stride 2.
KERNEL_SIZE = 4
ENCODER_CHANNELS = (12, 24, 48)
# Input height and width must be multiples of 2**3 so that the decoder gives the input size back.
DOWNSAMPLING = 8

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# PyTorch's default initialisation of Conv2d and ConvTranspose2d (kaiming_uniform with
# a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Faithful, because the official recipe
# (SGD, lr 0.1) was tuned with it. flax's fan_in is kh·kw·kernel.shape[-2]: in_channels for a
# conv kernel [kh, kw, in, out], and out_channels for a transposed-conv kernel [kh, kw, out, in],
# which is also what PyTorch calls the fan-in of a ConvTranspose2d weight [in, out, kh, kw].
# The initialisers are `common.torch_kernel_init` and `common.torch_bias_init(fan_in)`.


def _space_to_depth(x: jax.Array) -> jax.Array:
  """[B, 2h, 2w, C] → [B, h, w, 4C], channels ordered (row parity, column parity, C)."""
  b, h2, w2, c = x.shape
  x = x.reshape(b, h2 // 2, 2, w2 // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h2 // 2, w2 // 2, 4 * c)


def conv_down(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `Conv2d(k=4, stride=2, padding=1)` (no bias), kernel `[4, 4, in, out]`.

  Computed as a 2×2 stride-1 conv over the 2×2 space-to-depth of the padded input: the same
  sums, but the backward pass needs no input dilation, which XLA's CPU backend runs slowly.
  Tap (2a + p, 2b + q) of the 4×4 kernel becomes tap (a, b) on input channel group (p, q).
  """
  c, f = kernel.shape[2:]
  x = _space_to_depth(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  folded = kernel.reshape(2, 2, 2, 2, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, f)
  return jax.lax.conv_general_dilated(x, folded.astype(x.dtype), (1, 1), 'VALID',
                                      dimension_numbers=_DIMENSION_NUMBERS)


# For output row 2m + r of a stride-2, padding-1, 4-tap transposed conv, the contributing
# input rows m - 1 + r and m + r (rows m + r and m + r + 1 of the input padded by 1) meet
# kernel taps 3, 1 (r = 0) and 2, 0 (r = 1).
_PHASE_TAPS = ((3, 1), (2, 0))


def conv_up(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """PyTorch's `ConvTranspose2d(k=4, stride=2, padding=1)` (no bias), kernel `[4, 4, out, in]`.

  Equals `lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), transpose_kernel=True)`
  (the gradient of `conv_down` with this kernel; PyTorch's weight `[in, out, kh, kw]` is this
  kernel transposed). Computed as one 2×2 stride-1 conv with the four output phases
  (row parity, column parity) as channel groups, then interleaved (sub-pixel convolution):
  no multiplications by the zeros a dilated input would hold.
  """
  b, h, w, c = x.shape
  f = kernel.shape[2]
  phases = []
  for row_taps in _PHASE_TAPS:
    for column_taps in _PHASE_TAPS:
      taps = kernel[jnp.array(row_taps)][:, jnp.array(column_taps)]  # [2, 2, out, in]
      phases.append(taps.transpose(0, 1, 3, 2))  # [2, 2, in, out]
  folded = jnp.stack(phases, axis=-2).reshape(2, 2, c, 4 * f)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = jax.lax.conv_general_dilated(padded, folded.astype(x.dtype), (1, 1), 'VALID',
                                   dimension_numbers=_DIMENSION_NUMBERS)
  y = y.reshape(b, h + 1, w + 1, 2, 2, f)
  # Phase (r, s) of output pixel (m, n) sits at conv position (m + r, n + s).
  rows = [jnp.stack([y[:, r:r + h, s:s + w, r, s] for s in (0, 1)], axis=3) for r in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, f)


class _Layer(nn.Module):
  """One conv_down or conv_up layer with PyTorch's initialisation and a bias."""
  features: int
  transposed: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    if self.transposed:
      shape = (KERNEL_SIZE, KERNEL_SIZE, self.features, in_features)
      fan_in = KERNEL_SIZE * KERNEL_SIZE * self.features  # PyTorch's ConvTranspose2d fan-in.
    else:
      shape = (KERNEL_SIZE, KERNEL_SIZE, in_features, self.features)
      fan_in = KERNEL_SIZE * KERNEL_SIZE * in_features
    kernel = self.param('kernel', common.torch_kernel_init, shape, jnp.float32)
    bias = self.param('bias', common.torch_bias_init(fan_in), (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    y = conv_up(x, kernel) if self.transposed else conv_down(x, kernel)
    return y + bias.astype(self.dtype)


class ConvAutoencoder(nn.Module):
  """Three stride-2 convs down, three mirrored stride-2 transposed convs up, a sigmoid out.

  Layout for a `[B, 32, 32, C]` input (NHWC; every layer 4×4, stride 2, padding 1):

    encoder: conv C→12 (16×16) → ReLU → conv 12→24 (8×8) → ReLU → conv 24→48 (4×4) → ReLU
    decoder: tconv 48→24 (8×8) → ReLU → tconv 24→12 (16×16) → ReLU → tconv 12→C (32×32)
             → sigmoid

  Checked against JEKimLab/ReffAKD `fashion_mnist/autoencoder.ipynb` (the CIFAR-100 and
  Tiny-ImageNet notebooks differ only in the channel count): `Conv2d(k=4, s=2, padding=1)`,
  `ConvTranspose2d(k=4, s=2, padding=1)` (each exactly doubles the size), biases everywhere,
  PyTorch's default initialisation. The layers compute exactly those functions (see
  `conv_down`, `conv_up`; they are rearranged to run fast on XLA's CPU backend). Kernels:
  conv `[4, 4, in, out]`; transposed conv `[4, 4, out, in]`, flax's `transpose_kernel=True`
  layout, i.e. PyTorch's `[in, out, kh, kw]` weight transposed.

  The embedding is the encoder output after its ReLU, flattened: `48·(H/8)·(W/8)` values
  (768 for 32×32 input, as the notebooks' `encoded.view(-1, 48*4*4)`). We flatten NHWC where
  PyTorch flattens NCHW; the order of the entries does not change a cosine similarity.

  Parameters, `C` input channels (weights + biases):
    conv1 16·C·12 + 12, conv2 16·12·24 + 24 = 4,632, conv3 16·24·48 + 48 = 18,480,
    tconv1 16·48·24 + 24 = 18,456, tconv2 16·24·12 + 12 = 4,620, tconv3 16·12·C + C;
    total 46,585 for C = 1 (Fashion-MNIST), 47,355 for C = 3.

  Attributes:
    channels: input (and reconstruction) channels `C`.
    dtype: computation dtype (parameters are float32).

  Returns from `__call__(images)` a pair:
    reconstruction `[B, H, W, C]` in (0, 1) (the sigmoid), float32;
    embedding `[B, 48·(H/8)·(W/8)]` float32, non-negative.

  References:
    Doshi & Kim, ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
    arXiv 2404.09886 (code: github.com/JEKimLab/ReffAKD).
  """
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    height, width = images.shape[-3:-1]
    if height % DOWNSAMPLING or width % DOWNSAMPLING:
      raise ValueError(f'ConvAutoencoder needs height and width divisible by {DOWNSAMPLING}, '
                       f'got {height}x{width}; resize the images (Fashion-MNIST: to 32x32)')
    if images.shape[-1] != self.channels:
      raise ValueError(f'ConvAutoencoder(channels={self.channels}) got images with '
                       f'{images.shape[-1]} channels')
    x = images
    for i, features in enumerate(ENCODER_CHANNELS):
      x = nn.relu(_Layer(features, transposed=False, dtype=self.dtype,
                         name=f'encoder_conv{i + 1}')(x))
    code = x
    decoder_channels = tuple(reversed(ENCODER_CHANNELS[:-1])) + (self.channels,)
    for i, features in enumerate(decoder_channels):
      x = _Layer(features, transposed=True, dtype=self.dtype, name=f'decoder_tconv{i + 1}')(x)
      x = nn.relu(x) if i < len(decoder_channels) - 1 else nn.sigmoid(x)
    reconstruction = x.astype(jnp.float32)
    embedding = code.reshape((code.shape[0], -1)).astype(jnp.float32)
    return reconstruction, embedding
