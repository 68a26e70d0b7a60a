"""ImageNet ResNet-50 and ResNet-152 (bottleneck blocks), PS-KD's ImageNet network."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common

_STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4  # a bottleneck block outputs 4× its width


class Bottleneck(nn.Module):
  """conv1×1-BN-ReLU-conv3×3-BN-ReLU-conv1×1(×4)-BN, plus a shortcut, then ReLU.

  The stride sits on the 3×3 conv (torchvision's "ResNet v1.5", also PS-KD's) and on the
  projection shortcut, a 1×1 conv + BN used wherever the stride or the depth changes
  (the first block of every stage). No conv biases; PyTorch padding 1 for the 3×3 conv.
  `zero_init_residual` starts the scale of 'bn3' at zero, so that the block starts as
  its shortcut (torchvision's `zero_init_residual=True`).
  """
  width: int
  strides: int
  dtype: Any
  bn_axis_name: str | None
  init_scheme: str = 'flax'
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    def conv(x, features, kernel, strides, name):
      return common.conv(x, features, kernel, strides=strides, init=self.init_scheme,
                         dtype=self.dtype, name=name)

    out_features = self.width * EXPANSION
    y = nn.relu(norm('bn1')(conv(x, self.width, 1, 1, 'conv1')))
    y = nn.relu(norm('bn2')(conv(y, self.width, 3, self.strides, 'conv2')))
    y = conv(y, out_features, 1, 1, 'conv3')
    if self.zero_init_residual:
      # `common.batch_norm` with its scale starting at zero instead of one.
      y = nn.BatchNorm(use_running_average=not train, momentum=common.BN_MOMENTUM,
                       epsilon=common.BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,
                       axis_name=self.bn_axis_name, scale_init=nn.initializers.zeros_init(),
                       name='bn3')(y)
    else:
      y = norm('bn3')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = norm('shortcut_bn')(conv(x, out_features, 1, self.strides, 'shortcut_conv'))
    return nn.relu(y + shortcut)


class BottleneckResNet(nn.Module):
  """ResNet for 224×224 ImageNet images: torchvision's resnet50 / resnet152 layer for layer.

  7×7 conv stem (64 channels, stride 2, padding 3) → BN → ReLU → 3×3 max-pool (stride 2,
  padding 1, the padding never wins: -inf, as PyTorch's); four stages of `stage_sizes`
  `Bottleneck` blocks of widths 64/128/256/512 (outputs 256/512/1024/2048 channels),
  strides 1/2/2/2 on the first block's 3×3 conv and projection shortcut; global average
  pool; 'classifier' (Dense with bias). (3, 4, 6, 3) is ResNet-50, (3, 8, 36, 3)
  ResNet-152. Strided convs use explicit PyTorch padding (`common.conv`), not flax's
  'SAME' (which pads (0, 1) for a stride-2 conv on an even input).

  PS-KD's ImageNet network: lgcnsai/PS-KD-Pytorch `models/network.py` builds, for
  `--data_type imagenet --classifier_type ResNet152` (its only ImageNet choice),
  `ResNet(dataset='imagenet', depth=152, num_classes=1000, bottleneck=True)` of
  `models/resnet_imagenet.py` (a copy of torchvision's ResNet: the same stem, max-pool,
  `Bottleneck` with the stride on the 3×3 conv, 1×1 conv + BN downsample, stages
  [3, 8, 36, 3], `AdaptiveAvgPool2d(1)`, `fc` with bias; depth 50 gives [3, 4, 6, 3]).
  Its state dict has torchvision's names and shapes, and with the same weights both give
  the same logits. Its init loop: every conv N(0, 2/(kh·kw·out_channels)) (Kaiming normal
  fan_out), BN weight 1 and bias 0, the Linear layer left at PyTorch's default, no
  zero-initialised residual BN: that is `init_scheme='kaiming_fan_out'` with
  `zero_init_residual=False` (also torchvision's own init and default).

  Parameters at 1000 classes, equal to torchvision's `resnet50()` / `resnet152()` and to
  PS-KD's `ResNet('imagenet', 50 / 152, 1000)` (counted with torch):
    ResNet-50: 25,557,032 (stem conv 9,408 + BN 128; stage 1 215,808; stage 2 1,219,584;
      stage 3 7,098,368; stage 4 14,964,736; classifier 2,049,000).
    ResNet-152: 60,192,808 (stem 9,536; stage 1 215,808; stage 2 2,339,840; stage 3
      40,613,888; stage 4 14,964,736; classifier 2,049,000).
  BatchNorm running statistics add 53,120 (ResNet-50) / 151,424 (ResNet-152) numbers.

  Attributes:
    num_classes: number of output classes.
    stage_sizes: blocks per stage ((3, 4, 6, 3) = ResNet-50).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`; PS-KD's and
      torchvision's code is 'kaiming_fan_out'.
    zero_init_residual: start each block's last BN scale at 0 (torchvision's option,
      off by default there and absent from PS-KD's code).

  Returns from `__call__(x, train=...)` a dict (`common.classifier_outputs`):
    'logits' [B, C] float32; 'features' [B, 2048] float32 (pooled, the classifier's
    input); 'feature_map' [B, h/32, w/32, 2048] float32 (the stage-4 output);
    'dense_logits' [B, h/32, w/32, C]; 'stage_features' = the four stage outputs,
    [B, h/4, w/4, 256], [B, h/8, w/8, 512], [B, h/16, w/16, 1024], [B, h/32, w/32, 2048].

  References:
    He et al., Deep residual learning for image recognition, CVPR 2016.
    Kim et al., Self-knowledge distillation with progressive refinement of targets,
    ICCV 2021 (PS-KD; code: github.com/lgcnsai/PS-KD-Pytorch).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    common.check_init(self.init_scheme)
    x = common.conv(x, 64, 7, strides=2, init=self.init_scheme, dtype=self.dtype,
                    name='stem_conv')
    x = common.batch_norm(train=train, dtype=self.dtype,
                          axis_name=self.bn_axis_name, name='stem_bn')(x)
    x = nn.relu(x)
    # flax pools through lax.reduce_window, whose padding takes the init value, -inf.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stage_features = []
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, _STAGE_WIDTHS)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(width, strides, self.dtype, self.bn_axis_name, self.init_scheme,
                       self.zero_init_residual,
                       name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme)
