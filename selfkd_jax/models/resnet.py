"""CIFAR ResNet-18 (post-activation) and PreAct ResNet-18 (PS-KD's)."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common

_STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """conv3×3-BN-ReLU-conv3×3-BN, plus identity or 1×1 conv+BN projection, then ReLU.

  The stride sits in the first conv and in the projection. Convs have no bias (PyTorch
  padding 1 for the 3×3 convs); `init_scheme` is a `common.INIT_SCHEMES` name.
  """
  features: int
  strides: int
  dtype: Any
  bn_axis_name: str | None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    def conv(x, kernel, strides, name):
      return common.conv(x, self.features, kernel, strides=strides, init=self.init_scheme,
                         dtype=self.dtype, name=name)

    y = conv(x, 3, self.strides, 'conv1')
    y = nn.relu(norm('bn1')(y))
    y = conv(y, 3, 1, 'conv2')
    y = norm('bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(x, 1, self.strides, 'shortcut_conv')
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
  model is built from pre-activation blocks: use `PreActResNet` (layout 'pskd') to
  reproduce it.

  Parameters, ResNet-18 with 100 classes: 11,220,132 (stem 1,728 + BN 128; stage 1
  147,968; stage 2 525,568; stage 3 2,099,712; stage 4 8,393,728; classifier 51,300).

  This is also the backbone of BYOT: luanyunteng/pytorch-be-your-own-teacher
  `models/resnet.py` (`multi_resnet18_kd`, `Multi_ResNet` with `BasicBlock`) and the
  authors' journal code ArchipLab-LinfengZhang/pytorch-self-distillation-final
  `resnet.py` (`resnet18`): the same stem, blocks, strides, projection and pooling
  (ArchipLab's `maxpool` is built but never called), 11,220,132 parameters without
  the exits. Their exits are not part of this model (see `selfkd_jax.models.exits`,
  which follows ArchipLab's SepConv exits). luanyunteng's `Multi_ResNet` has other
  exits (`branchBottleNeck`: 1×1-BN-ReLU, k×k stride-k, 1×1, convs with biases) and
  three `downsample*_1` 1×1 conv+BN modules it never calls (232,448 parameters);
  with them and its exits it counts 13,243,600 at 100 classes.

  No conv biases. Initialisation by `init_scheme` (`common.INIT_SCHEMES`); the default
  'flax' gives the convs Kaiming-normal fan_out (torchvision's) and the classifier
  flax's default (LeCun normal, zero bias); BYOT's code is 'kaiming_fan_out'.

  Attributes:
    num_classes: number of output classes.
    stage_sizes: blocks per stage ((2, 2, 2, 2) = ResNet-18).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

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
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    common.check_init(self.init_scheme)
    x = common.conv(x, 64, 3, init=self.init_scheme, dtype=self.dtype, name='stem_conv')
    x = common.batch_norm(train=train, dtype=self.dtype,
                          axis_name=self.bn_axis_name, name='stem_bn')(x)
    x = nn.relu(x)
    stage_features = []
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, _STAGE_WIDTHS)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, self.dtype, self.bn_axis_name, self.init_scheme,
                       name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme)


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
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    def conv(x, kernel, strides, name):
      return common.conv(x, self.features, kernel, strides=strides, init=self.init_scheme,
                         dtype=self.dtype, name=name)

    preact = nn.relu(norm('bn1')(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(preact, 1, self.strides, 'shortcut_conv')
    else:
      shortcut = preact if self.identity_from_preactivation else x
    y = conv(preact, 3, self.strides, 'conv1')
    y = nn.relu(norm('bn2')(y))
    y = conv(y, 3, 1, 'conv2')
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

  Zipf's label smoothing: `--arch CIFAR_ResNet18` (zipfls `pytorch_zipfls/cifar_models/
  resnet.py`, `CIFAR_ResNet(PreActBlock, [2, 2, 2, 2])`) is `layout='pskd'` layer for
  layer: BN-ReLU stem, identity and projection shortcuts from the pre-activated input,
  no final BN-ReLU, `AvgPool2d(4)` on the 4×4 map, `linear` with bias. Its module also
  builds two more heads, `linear3` (256→C after `gap3 = AvgPool2d(8)` on stage 3) and
  `linear2` (128→C after `gap2 = AvgPool2d(16)` on stage 2): 25,700 + 12,900 = 38,600
  parameters at C = 100, 11,256,044 in all. `train.py` puts them in the loss only with
  `--deeplayer` 2 or 3 (default 1, which its README's CIFAR commands keep), so in the
  published recipe they get no gradient and never change the network's outputs; they
  are not built here. Its code has no init loop: `init_scheme='pytorch'` reproduces it.

  Parameters, 100 classes, `layout='pskd'`: 11,217,444 (stem conv 1,728 + BN 128;
  stage 1 147,968; stage 2 525,184; stage 3 2,098,944; stage 4 8,392,192; classifier
  51,300). `layout='he2016'`: 11,218,340 (−128 stem BN, +1,024 final BN).

  No conv biases. Initialisation by `init_scheme` (`common.INIT_SCHEMES`): the default
  'flax' gives the convs Kaiming-normal fan_out (torchvision's) and the classifier
  LeCun normal; PS-KD's, CS-KD's and Zipf's code has no init loop, which is
  `init_scheme='pytorch'` (PyTorch's layer defaults, Kaiming uniform with a=√5).

  Attributes:
    num_classes: number of output classes.
    stage_sizes: blocks per stage ((2, 2, 2, 2) = ResNet-18).
    layout: 'pskd' (faithful to PS-KD's code) or 'he2016'.
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

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
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    if self.layout not in ('pskd', 'he2016'):
      raise ValueError(f"unknown layout {self.layout!r}; allowed: pskd, he2016")
    common.check_init(self.init_scheme)
    pskd = self.layout == 'pskd'

    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype,
                               axis_name=self.bn_axis_name, name=name)

    x = common.conv(x, 64, 3, init=self.init_scheme, dtype=self.dtype, name='stem_conv')
    if pskd:
      x = nn.relu(norm('stem_bn')(x))
    stage_features = []
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, _STAGE_WIDTHS)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = PreActBlock(width, strides, pskd, self.dtype, self.bn_axis_name, self.init_scheme,
                        name=f'stage{i + 1}_block{j + 1}')(x, train=train)
      stage_features.append(x)
    if not pskd:
      x = nn.relu(norm('final_bn')(x))
    return common.classifier_outputs(
        common.global_average_pool(x), x, stage_features, self.num_classes, self.init_scheme)
