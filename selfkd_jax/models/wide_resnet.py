"""Wide Residual Networks (WRN-d-k) for 32×32 images."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common


class WideBasicBlock(nn.Module):
  """BN-ReLU-conv3×3-BN-ReLU-[dropout]-conv3×3 plus a shortcut.

  As in Zagoruyko & Komodakis' code: the stride sits in the first conv; where the
  shape changes the shortcut is a 1×1 conv of the pre-activated input relu(bn1(x)),
  elsewhere it is the raw input x.
  """
  features: int
  strides: int
  dropout_rate: float
  conv_bias: bool
  dtype: Any
  bn_axis_name: str | None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    def conv(x, kernel, strides, name):
      return common.conv(x, self.features, kernel, strides=strides,
                         use_bias=self.conv_bias, init=self.init_scheme, dtype=self.dtype,
                         name=name)

    preact = nn.relu(norm('bn1')(x))
    y = conv(preact, 3, self.strides, 'conv1')
    y = nn.relu(norm('bn2')(y))
    if self.dropout_rate > 0:
      # Needs a 'dropout' rng only when train=True.
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(y, 3, 1, 'conv2')
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(preact, 1, self.strides, 'shortcut_conv')
    else:
      shortcut = x
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-width for 32×32 images (WRN-28-10 by default).

  3×3 conv stem (16 channels) → three groups of n = (depth−4)/6 pre-activation basic
  blocks with 16·width, 32·width, 64·width channels and strides 1/2/2 → BN → ReLU →
  global average pool → 'classifier'. Dropout (`dropout_rate`, default 0.0) between
  the two convs of each block, as in the paper.

  Conv biases: `conv_bias=True` (default) gives every conv a bias, as the widely used
  PyTorch port meliketoy/wide-resnet.pytorch does; that is where the usual
  CIFAR-100 count of 36,546,980 for WRN-28-10 comes from. The official code has no
  conv biases (`conv_bias=False`, 36,536,884); a bias in front of a BatchNorm is
  redundant, so the choice only moves the parameter count. Unlike that port, the block
  follows the paper's code (stride in the first conv, projection from the
  pre-activated input, dropout after the second ReLU); the parameter count is the same.

  The CIFAR-100 distillation benchmark (mdistiller `mdistiller/models/cifar/wrn.py`,
  the same as RepDistiller `models/wrn.py`) has this block and layout without conv
  biases: registered as 'wrn40_2' (its teacher) and 'wrn16_2_nobias' (its WRN-16-2
  student; 'wrn16_2' keeps conv biases, as configs written before use it). Its
  `AvgPool2d(8)` on the 8×8 map is our global average pool at 32×32.

  Parameters, 100 classes: WRN-28-10 36,546,980 (36,536,884 without conv biases);
  WRN-16-2 704,420 (703,284 without conv biases, = mdistiller's `wrn_16_2`); WRN-40-2
  without conv biases 2,255,156 (= mdistiller's `wrn_40_2`).

  Initialisation by `init_scheme` (`common.INIT_SCHEMES`); the default 'flax' gives the
  convs Kaiming-normal fan_out (the paper's code uses Kaiming normal too), conv biases
  zero, the classifier flax's default. Under 'kaiming_fan_out' the classifier bias
  starts at zero, as in mdistiller's `wrn.py` (its loop: convs N(0, 2/(k·k·out)),
  BN 1/0, Linear bias zeroed, Linear weight left at PyTorch's default uniform).

  Attributes:
    num_classes: number of output classes.
    depth: total depth d, with (d − 4) divisible by 6.
    width: widening factor k.
    dropout_rate: dropout inside each block; > 0 needs a 'dropout' rng in training.
    conv_bias: add a bias to every conv (see above).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, 64k] float32 (pooled, the classifier's
    input); 'feature_map' [B, h/4, w/4, 64k] float32 (after the final BN-ReLU, the map
    that is pooled); 'stage_features' = the three group outputs (before the final
    BN-ReLU), [B, h, w, 16k], [B, h/2, w/2, 32k], [B, h/4, w/4, 64k].

  References:
    Zagoruyko & Komodakis, Wide residual networks, BMVC 2016
    (code: github.com/szagoruyko/wide-residual-networks).
  """
  num_classes: int
  depth: int = 28
  width: int = 10
  dropout_rate: float = 0.0
  conv_bias: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4 with n >= 1, got {self.depth}')
    common.check_init(self.init_scheme)
    blocks_per_group = (self.depth - 4) // 6
    x = common.conv(x, 16, 3, use_bias=self.conv_bias, init=self.init_scheme, dtype=self.dtype,
                    name='stem_conv')
    stage_features = []
    for i, (factor, strides) in enumerate(zip((16, 32, 64), (1, 2, 2))):
      for j in range(blocks_per_group):
        x = WideBasicBlock(
            factor * self.width, strides if j == 0 else 1, self.dropout_rate,
            self.conv_bias, self.dtype, self.bn_axis_name, self.init_scheme,
            name=f'group{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    x = common.batch_norm(train=train, dtype=self.dtype,
                          axis_name=self.bn_axis_name, name='final_bn')(x)
    x = nn.relu(x)
    classifier_init = None
    if self.init_scheme == 'kaiming_fan_out':  # mdistiller's wrn.py zeroes the Linear bias
      classifier_init = common.LayerInit(
          common.torch_kernel_init, common.zeros_init)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme,
        classifier_init)
