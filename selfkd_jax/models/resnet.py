"""CIFAR ResNet-18 (post-activation) and PreAct ResNet-18 (PS-KD's)."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common

# PyTorch's conv3x3 uses padding=1 on both sides. Flax's 'SAME' pads (0, 1) for a
# stride-2 conv on an even input, which samples different pixels; pad explicitly.
_PAD1 = ((1, 1), (1, 1))
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str):
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides),
      padding=_PAD1 if kernel == 3 else 'VALID', use_bias=False,
      kernel_init=common.conv_kernel_init, dtype=dtype, param_dtype=jnp.float32,
      name=name)


class BasicBlock(nn.Module):
  """conv3×3-BN-ReLU-conv3×3-BN, plus identity or 1×1 conv+BN projection, then ReLU."""
  features: int
  strides: int
  dtype: Any
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    y = _conv(self.features, 3, self.strides, self.dtype, 'conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = norm('bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.strides, self.dtype, 'shortcut_conv')(x)
      shortcut = norm('shortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet for 32×32 images, the kuangliu/pytorch-cifar layout (ResNet-18 by default).

  3×3 conv stem (64 channels, stride 1) → BN → ReLU, no max-pool; four stages of
  `stage_sizes` BasicBlocks with 64/128/256/512 channels and strides 1/2/2/2 (1×1
  conv+BN projection shortcut where the shape changes); global average pool;
  'classifier'. This is the ResNet-18 of Tf-KD (yuanli2333/Teacher-free-Knowledge-
  Distillation, `model/resnet.py`). Zipf's label smoothing (megvii-research/zipfls,
  `pytorch_zipfls/cifar_models/resnet.py`) calls its CIFAR model "ResNet-18", but that
  model is built from pre-activation blocks: use `PreActResNet` to reproduce it.

  Parameters, ResNet-18 with 100 classes: 11,220,132 (stem 1,728 + BN 128; stage 1
  147,968; stage 2 525,568; stage 3 2,099,712; stage 4 8,393,728; classifier 51,300).

  Convs use Kaiming-normal fan_out initialisation (torchvision's), no conv biases;
  the classifier flax's default (LeCun normal, zero bias).

  Attributes:
    num_classes: number of output classes.
    stage_sizes: blocks per stage ((2, 2, 2, 2) = ResNet-18).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, 512] float32 (pooled, the classifier's
    input); 'feature_map' [B, h/8, w/8, 512] float32 (the stage-4 output);
    'stage_features' = the four stage outputs, [B, h, w, 64] ... [B, h/8, w/8, 512].

  References:
    He et al., Deep residual learning for image recognition, CVPR 2016.
    Yuan et al., Revisiting knowledge distillation via label smoothing
    regularization, CVPR 2020 (Tf-KD).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    x = _conv(64, 3, 1, self.dtype, 'stem_conv')(x)
    x = common.batch_norm(train=train, dtype=self.dtype,
                          axis_name=self.bn_axis_name, name='stem_bn')(x)
    x = nn.relu(x)
    stage_features = []
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, _STAGE_WIDTHS)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, self.dtype, self.bn_axis_name,
                       name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes)


class PreActBlock(nn.Module):
  """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus a shortcut.

  The projection shortcut (1×1 conv, no BN) takes the pre-activated input
  relu(bn1(x)). The identity shortcut takes relu(bn1(x)) too when
  `identity_from_preactivation` (PS-KD's code: its shortcut is an empty
  `nn.Sequential` applied to the pre-activated tensor), else x (He et al. 2016).
  """
  features: int
  strides: int
  identity_from_preactivation: bool
  dtype: Any
  bn_axis_name: str | None

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    preact = nn.relu(norm('bn1')(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.strides, self.dtype,
                       'shortcut_conv')(preact)
    else:
      shortcut = preact if self.identity_from_preactivation else x
    y = _conv(self.features, 3, self.strides, self.dtype, 'conv1')(preact)
    y = nn.relu(norm('bn2')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    return y + shortcut


class PreActResNet(nn.Module):
  """Pre-activation ResNet for 32×32 images, PS-KD's PreAct ResNet-18 by default.

  `layout='pskd'` follows lgcnsai/PS-KD-Pytorch `models/preact_resnet.py`
  (`CIFAR_ResNet18_preActBasic`, the same network as alinlab/cs-kd and
  megvii-research/zipfls' CIFAR "ResNet-18"), checked against that file:
    3×3 conv stem (64, stride 1) → BN → ReLU; four stages of PreActBlocks
    (64/128/256/512 channels, strides 1/2/2/2; 1×1 conv projection without BN on the
    pre-activated input where the shape changes; identity shortcut also taken from the
    pre-activated input); NO BN-ReLU after the last stage; global average pool
    (their `avg_pool2d(4)` on the 4×4 map); 'classifier' (Linear with bias).
  `layout='he2016'` is the layout of He et al. (2016): no BN-ReLU after the stem,
  identity shortcut from the raw block input, and a final BN-ReLU before pooling.

  Parameters, 100 classes, `layout='pskd'`: 11,217,444 (stem conv 1,728 + BN 128;
  stage 1 147,968; stage 2 525,184; stage 3 2,098,944; stage 4 8,392,192; classifier
  51,300). `layout='he2016'`: 11,218,340 (−128 stem BN, +1,024 final BN).

  Convs use Kaiming-normal fan_out initialisation (torchvision's); PS-KD's code keeps
  PyTorch's default conv init (Kaiming uniform, a=√5). No conv biases.

  Attributes:
    num_classes: number of output classes.
    stage_sizes: blocks per stage ((2, 2, 2, 2) = ResNet-18).
    layout: 'pskd' (faithful to PS-KD's code) or 'he2016'.
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, 512] float32 (pooled, the classifier's
    input); 'feature_map' [B, h/8, w/8, 512] float32 (the map that is pooled: the
    stage-4 output for 'pskd', after the final BN-ReLU for 'he2016');
    'stage_features' = the four stage outputs.

  References:
    He et al., Identity mappings in deep residual networks, ECCV 2016.
    Kim et al., Self-knowledge distillation with progressive refinement of targets,
    ICCV 2021 (PS-KD; code: github.com/lgcnsai/PS-KD-Pytorch).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  layout: str = 'pskd'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    if self.layout not in ('pskd', 'he2016'):
      raise ValueError(f"unknown layout {self.layout!r}; allowed: pskd, he2016")
    pskd = self.layout == 'pskd'

    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    x = _conv(64, 3, 1, self.dtype, 'stem_conv')(x)
    if pskd:
      x = nn.relu(norm('stem_bn')(x))
    stage_features = []
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, _STAGE_WIDTHS)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = PreActBlock(width, strides, pskd, self.dtype, self.bn_axis_name,
                        name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    if not pskd:
      x = nn.relu(norm('final_bn')(x))
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes)
