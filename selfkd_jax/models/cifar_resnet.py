"""The three-stage CIFAR ResNets of the CIFAR-100 distillation benchmark (resnet20 ...)."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common
from selfkd_jax.models.resnet import BasicBlock


class RepDistillerResNet(nn.Module):
  """ResNet-depth for 32×32 images, as in RepDistiller's and mdistiller's CIFAR code.

  Checked layer by layer against HobbitLong/RepDistiller `models/resnet.py` and
  megvii-research/mdistiller `mdistiller/models/cifar/resnet.py` (the same network;
  `ResNet(depth, num_filters, 'basicblock')`), He et al.'s 6n+2 CIFAR family:
    3×3 conv stem (`widths[0]` channels, stride 1, padding 1, no bias) → BN → ReLU;
    three stages of n = (depth − 2)/6 BasicBlocks (`resnet.BasicBlock`:
    conv3×3(stride)-BN-ReLU-conv3×3-BN, + shortcut, then ReLU) with `widths[1:]`
    channels and strides 1/2/2, the stride in the first conv of a stage's first block;
    the shortcut is a 1×1 conv (stride, no bias) + BN wherever the stride is 2 or the
    width changes (also in stage 1 when widths[0] != widths[1], e.g. resnet8x4), else
    the identity; their `AvgPool2d(8)` on the final 8×8 map = our global average pool
    at 32×32; 'classifier' (their `fc`, Linear with bias).
  Registered names (their `num_filters`):
    'resnet20' (depth 20, 16/16/32/64), 'resnet56' (56, 16/16/32/64),
    'resnet8x4' (8, 32/64/128/256), 'resnet32x4' (32, 32/64/128/256).

  Parameters with 100 classes, equal to the PyTorch models' (counted by
  instantiating the official definitions): resnet20 278,324; resnet56 861,620;
  resnet8x4 1,233,540; resnet32x4 7,433,860.

  Initialisation by `init_scheme` (`common.INIT_SCHEMES`). Their code is
  'kaiming_fan_out': `kaiming_normal_(mode='fan_out', nonlinearity='relu')` on every
  conv, BN 1/0, the Linear layer left at PyTorch's default (weight and bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)); its bias is not zeroed).

  Attributes:
    num_classes: number of output classes.
    depth: 6n + 2 (8, 20, 32, 56, ...).
    widths: their `num_filters`: stem width, then the three stage widths.
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, widths[3]] float32 (pooled, the
    classifier's input); 'feature_map' [B, h/4, w/4, widths[3]] float32 (the stage-3
    output, the map that is pooled); 'dense_logits' [B, h/4, w/4, C];
    'stage_features' = the three stage outputs (after their final ReLU, their
    `feats[1:]`), [B, h, w, widths[1]], [B, h/2, w/2, widths[2]],
    [B, h/4, w/4, widths[3]].

  References:
    He et al., Deep residual learning for image recognition, CVPR 2016.
    Tian et al., Contrastive representation distillation, ICLR 2020 (RepDistiller).
    Zhao et al., Decoupled knowledge distillation, CVPR 2022 (mdistiller).
  """
  num_classes: int
  depth: int = 20
  widths: Sequence[int] = (16, 16, 32, 64)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'ResNet depth must be 6n+2 with n >= 1, got {self.depth}')
    if len(self.widths) != 4:
      raise ValueError(f'widths must be (stem, stage 1, stage 2, stage 3), got {self.widths}')
    common.check_init(self.init_scheme)
    blocks_per_stage = (self.depth - 2) // 6
    x = common.conv(x, self.widths[0], 3, init=self.init_scheme, dtype=self.dtype, name='stem_conv')
    x = common.batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          name='stem_bn')(x)
    x = nn.relu(x)
    stage_features = []
    for i, width in enumerate(self.widths[1:]):
      for j in range(blocks_per_stage):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, self.dtype, self.bn_axis_name, self.init_scheme,
                       name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme)
