"""The VGGs (with BatchNorm) of the CIFAR-100 distillation benchmark: vgg8 and vgg13."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common

# Their `cfg`: conv widths of the five blocks. 'S' = vgg8, 'B' = vgg13.
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    'S': ((64,), (128,), (256,), (512,), (512,)),
    'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}

# N(0, 0.01²): their Linear weight init (`m.weight.data.normal_(0, 0.01)`).
_VGG_CLASSIFIER_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


class VGG(nn.Module):
  """VGG with BatchNorm for 32×32 images, as in RepDistiller's and mdistiller's CIFAR code.

  Checked layer by layer against HobbitLong/RepDistiller `models/vgg.py` and
  megvii-research/mdistiller `mdistiller/models/cifar/vgg.py` (the same network; the
  benchmark's 'vgg8' and 'vgg13' are their `vgg8_bn` = `VGG(cfg['S'],
  batch_norm=True)` and `vgg13_bn` = `VGG(cfg['B'], batch_norm=True)`):
    five blocks; each conv of a block is a 3×3 conv (stride 1, padding 1, WITH bias,
    as PyTorch's `nn.Conv2d` default) → BN → ReLU (their `_make_layers` drops a block's
    last ReLU and `forward` applies it, the same thing);
    a 2×2 max-pool (stride 2) after blocks 1, 2 and 3; after block 4 only when the input
    is 64 pixels high (their `if h == 64: x = self.pool3(x)`, for Tiny-ImageNet), so at
    32×32 blocks 4 and 5 both run at 4×4;
    global average pool (their `AdaptiveAvgPool2d((1, 1))`) → 'classifier' (their
    `classifier`, Linear(512, C) with bias). No fully connected hidden layers.
  Spatial sizes at 32×32: 32, 16, 8, 4, 4.

  Parameters with 100 classes, equal to the PyTorch models' (counted by
  instantiating the official definitions): vgg8 3,965,028; vgg13 9,462,180.

  Initialisation by `init_scheme` (`common.INIT_SCHEMES`). Their `_initialize_weights` is
  'kaiming_fan_out' with the VGG's own Linear init, which this class applies under
  that scheme: convs N(0, 2/(k·k·out)) (= `kaiming_normal_(mode='fan_out')`), conv
  biases zero, BN 1/0, Linear weight N(0, 0.01²) and bias zero (not PyTorch's
  default as in their ResNets).

  Attributes:
    num_classes: number of output classes.
    stages: conv widths of the five blocks (`VGG_CONFIGS`).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, 512] float32 (pooled, the classifier's
    input); 'feature_map' [B, h/8, w/8, 512] float32 (block 5's output, the map that is
    pooled); 'dense_logits' [B, h/8, w/8, C]; 'stage_features' = the five block
    outputs after their ReLU and before the following pool (their `feats`):
    [B, h, w, 64], [B, h/2, w/2, 128], [B, h/4, w/4, 256], [B, h/8, w/8, 512],
    [B, h/8, w/8, 512] at 32×32.

  References:
    Simonyan & Zisserman, Very deep convolutional networks for large-scale image
    recognition, ICLR 2015.
    Tian et al., Contrastive representation distillation, ICLR 2020 (RepDistiller).
  """
  num_classes: int
  stages: Sequence[Sequence[int]] = VGG_CONFIGS['S']
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    if len(self.stages) != 5 or not all(self.stages):
      raise ValueError(f'VGG needs five non-empty blocks, got {self.stages}')
    common.check_init(self.init_scheme)
    input_height = x.shape[1]
    stage_features = []
    for i, widths in enumerate(self.stages):
      if i > 0 and (i < 4 or input_height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j, width in enumerate(widths):
        x = common.conv(x, width, 3, use_bias=True, init=self.init_scheme, dtype=self.dtype,
                        name=f'stage{i + 1}_conv{j + 1}')
        x = common.batch_norm(train=train, dtype=self.dtype, axis_name=self.bn_axis_name,
                              name=f'stage{i + 1}_bn{j + 1}')(x)
        x = nn.relu(x)
      stage_features.append(x)
    classifier_init = None
    if self.init_scheme == 'kaiming_fan_out':  # their Linear init: N(0, 0.01²), bias zero
      classifier_init = common.LayerInit(_VGG_CLASSIFIER_KERNEL_INIT, common.zeros_init)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme,
        classifier_init)
