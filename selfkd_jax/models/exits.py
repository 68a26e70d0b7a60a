"""Auxiliary exits (early classifiers) on a backbone's stage features, for BYOT/HSAKD/LSSKD.

The exits are a separate linen module, never part of the backbone: `heads.ExitHead` attaches
them to it (`heads.with_heads`), so the backbone keeps exactly its own parameters and
evaluation/export use the backbone alone. The backbone only has to return
`outputs['stage_features']` (every model in this package does).

Two kinds, built for every stage but the last by `make_exits`:

- `ByotExit` ('byot'): BYOT's "shallow classifier". Checked against
  ArchipLab-LinfengZhang/pytorch-self-distillation-final, `resnet.py` (journal version):
    optional attention gate: mask = sigmoid(up(relu(bn(SepConv(x, stride 2))))), x <- x * mask
    ("up" is their bilinear ×2 upsampling; we resize bilinearly back to the input's h×w,
    which is the same on even sizes and also works on odd ones, e.g. LeNet's 5×5);
    a stack of downsampling blocks, one per remaining stage (their `scala_i`);
    global average pool (their `AvgPool2d(4, 4)` on the 4×4 map) -> the exit's feature;
    Dense -> logits (their `fc_i`).
  Their downsampling block is `SepConv` (`conv='sepconv'`, default): depthwise 3×3
  (stride s, padding 1) -> 1×1 conv -> BN -> ReLU -> depthwise 3×3 -> 1×1 conv to the
  output width -> BN -> ReLU, all convs without bias. `conv='plain'` is ours: 3×3 conv
  (stride s, padding 1, no bias) -> BN -> ReLU.
  Block widths and strides follow the backbone (ours, as a rule; it reproduces theirs on a
  ResNet): the k-th block of the exit after stage i outputs the width of stage i+k and has
  stride 2 exactly where the backbone's resolution drops from stage i+k-1 to stage i+k.
  CIFAR ResNet-18 (stages 32²×64, 16²×128, 8²×256, 4²×512): exit 1 = 64→128→256→512,
  exit 2 = 128→256→512, exit 3 = 256→512, each block stride 2, all ending at 4²×512 -> 512-d
  features, as in the official code. LeNet-5-BN (stages 14²×6, 5²×16): one exit, one block
  6→16 with stride 2 (14²×6 -> 7²×16; the backbone reaches 5²×16 with a 5×5 valid conv and a
  max-pool, a 3×3 stride-2 block gives 7×7, which the pool makes irrelevant) -> 16-d
  features. WRN-16-2: exits after groups 1 and 2 ending at 8²×128. The MLP's 1×1 "maps"
  work too (stride 1, the 3×3 convs see one position).
  The attention gate is on by default for 'byot' (the official ResNets always use it).

- `HsakdExit` ('hsakd'): HSAKD's auxiliary branch (winycg/HSAKD, `models/resnetv2.py`
  `Auxiliary_Classifier`): fresh copies of the backbone's later stages (same residual block
  class, same blocks per stage, first block strided where the backbone downsamples),
  global average pool, Dense over `rotations · num_classes` joint classes (4C: the
  self-supervised rotation task `4·y + k`). By default it also has a head on the LAST stage
  (their `block_extractor4`: one more copy of the last stage with stride 1), so LSSKD gets
  "heads on every stage". `block`: 'basic' (`resnet.BasicBlock`), 'preact'
  (`resnet.PreActBlock`, PS-KD layout), 'wide' (`wide_resnet.WideBasicBlock`, no conv bias,
  plus a final BN-ReLU before pooling like the WRN itself), or 'conv' (ours, for LeNet-5-BN
  and the MLP, whose "stages" are not residual: each later stage becomes one 3×3
  conv-BN-ReLU, strided where the backbone downsamples).

Every exit also gets a linear adapter (`adapters=True`, BYOT journal version: their
`adaptation_layers`, `nn.Linear(exit width, deepest width)`) mapping its pooled feature to
the width of the backbone's `outputs['features']`, for the feature loss. `adapters=False`
(BYOT conference version, `|f_i - f_deep|²` on the raw features) needs exit width ==
feature width (true for the ResNets: 512 = 512).

Initialisation by `make_exits(init=...)` (`common.INIT_SCHEMES`; the modules' field
`init_scheme`): the default 'flax' gives the convs Kaiming-normal fan_out (as the official code,
and as the backbones here) and the Dense layers flax's default (LeCun normal, zero bias). The
official BYOT code (ArchipLab's `resnet.py`: `kaiming_normal_(mode='fan_out')` on every conv,
Linear layers left at PyTorch's default) is `init='kaiming_fan_out'`. BatchNorm uses PyTorch's
defaults (`common.batch_norm`); in train mode its batch statistics are averaged over the named
axis given at call time (`axis_name`), so under `shard_map` they are the global batch's. Logits
and features come out in float32; the conv stacks compute in `dtype`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfkd_jax.models import common
from selfkd_jax.models.cifar_resnet import RepDistillerResNet
from selfkd_jax.models.registry import abstract_model
from selfkd_jax.models.resnet import BasicBlock, CifarResNet, PreActBlock, PreActResNet
from selfkd_jax.models.wide_resnet import WideBasicBlock, WideResNet

EXIT_KINDS = ('byot', 'hsakd')
BYOT_CONVS = ('sepconv', 'plain')
HSAKD_BLOCKS = ('basic', 'preact', 'wide', 'conv')

class SepConv(nn.Module):
  """BYOT's `SepConv`: dw3×3(stride)-1×1-BN-ReLU-dw3×3-1×1(to `features`)-BN-ReLU, no biases."""
  features: int
  strides: int
  dtype: Any = jnp.float32
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: str | None = None):
    channels = x.shape[-1]

    def norm(name):
      return common.batch_norm(train=train, dtype=self.dtype, axis_name=axis_name, name=name)

    def conv(x, features, kernel, strides, name, groups=1):
      return common.conv(x, features, kernel, strides=strides, groups=groups, init=self.init_scheme,
                         dtype=self.dtype, name=name)

    x = conv(x, channels, 3, self.strides, 'dw1', groups=channels)
    x = conv(x, channels, 1, 1, 'pw1')
    x = nn.relu(norm('bn1')(x))
    x = conv(x, channels, 3, 1, 'dw2', groups=channels)
    x = conv(x, self.features, 1, 1, 'pw2')
    return nn.relu(norm('bn2')(x))


class ConvBNReLU(nn.Module):
  """3×3 conv (stride, padding 1, no bias) -> BN -> ReLU."""
  features: int
  strides: int
  dtype: Any = jnp.float32
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: str | None = None):
    x = common.conv(x, self.features, 3, strides=self.strides, init=self.init_scheme,
                    dtype=self.dtype, name='conv')
    x = common.batch_norm(train=train, dtype=self.dtype, axis_name=axis_name, name='bn')(x)
    return nn.relu(x)


class ByotExit(nn.Module):
  """One BYOT exit: [attention gate] -> downsampling blocks -> global average pool -> Dense.

  Attributes:
    widths: output width of each downsampling block (may be empty: pool + Dense only).
    strides: stride of each block (same length as `widths`).
    num_classes: logits width.
    attention: multiply the input by BYOT's sigmoid attention mask first.
    conv: 'sepconv' (official) or 'plain' (ours) blocks.
    dtype: computation dtype of the conv stack (parameters float32).
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, *, train, axis_name=None)`: `(logits [B, C] float32,
  features [B, widths[-1]] float32)` (the pooled map, the Dense layer's input).
  """
  widths: Sequence[int]
  strides: Sequence[int]
  num_classes: int
  attention: bool = True
  conv: str = 'sepconv'
  dtype: Any = jnp.float32
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: str | None = None):
    if self.conv not in BYOT_CONVS:
      raise ValueError(f"ByotExit: conv={self.conv!r}; allowed: {', '.join(BYOT_CONVS)}")
    if len(self.widths) != len(self.strides):
      raise ValueError("ByotExit: widths and strides must have the same length")
    x = x.astype(self.dtype)
    if self.attention:
      channels = x.shape[-1]
      mask = SepConv(channels, 2, self.dtype, self.init_scheme, name='attention_conv')(
          x, train=train, axis_name=axis_name)
      mask = common.batch_norm(train=train, dtype=self.dtype, axis_name=axis_name,
                               name='attention_bn')(mask)
      mask = nn.relu(mask)
      mask = jax.image.resize(mask, x.shape[:3] + mask.shape[3:], method='bilinear')
      x = x * nn.sigmoid(mask)
    block = SepConv if self.conv == 'sepconv' else ConvBNReLU
    for k, (width, stride) in enumerate(zip(self.widths, self.strides)):
      x = block(width, stride, self.dtype, self.init_scheme, name=f'block{k + 1}')(
          x, train=train, axis_name=axis_name)
    features = common.global_average_pool(x)
    logits = common.dense(features, self.num_classes, init=self.init_scheme, dtype=jnp.float32,
                          name='classifier')
    return logits, features


class HsakdExit(nn.Module):
  """One HSAKD auxiliary branch: copies of the backbone's later stages -> pool -> Dense.

  Attributes:
    block: 'basic', 'preact', 'wide' or 'conv' (see the module docstring).
    widths, strides, blocks: per copied stage, its width, the stride of its first block and
      its number of blocks.
    num_classes: logits width (`4 · C` for the rotation task).
    dtype: computation dtype (parameters float32).
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, *, train, axis_name=None)`: `(logits, features)` as `ByotExit`.
  """
  block: str
  widths: Sequence[int]
  strides: Sequence[int]
  blocks: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x, *, train: bool, axis_name: str | None = None):
    if self.block not in HSAKD_BLOCKS:
      raise ValueError(f"HsakdExit: block={self.block!r}; allowed: {', '.join(HSAKD_BLOCKS)}")
    x = x.astype(self.dtype)
    for s, (width, stride, count) in enumerate(zip(self.widths, self.strides, self.blocks)):
      for j in range(count):
        strides = stride if j == 0 else 1
        name = f'stage{s + 1}_block{j + 1}'
        if self.block == 'basic':
          x = BasicBlock(width, strides, self.dtype, axis_name, self.init_scheme, name=name)(
              x, train=train)
        elif self.block == 'preact':
          x = PreActBlock(width, strides, True, self.dtype, axis_name, self.init_scheme, name=name)(
              x, train=train)
        elif self.block == 'wide':
          x = WideBasicBlock(width, strides, 0.0, False, self.dtype, axis_name, self.init_scheme,
                             name=name)(x, train=train)
        else:
          x = ConvBNReLU(width, strides, self.dtype, self.init_scheme, name=name)(
              x, train=train, axis_name=axis_name)
    if self.block == 'wide':
      x = common.batch_norm(train=train, dtype=self.dtype, axis_name=axis_name,
                            name='final_bn')(x)
      x = nn.relu(x)
    features = common.global_average_pool(x)
    logits = common.dense(features, self.num_classes, init=self.init_scheme, dtype=jnp.float32,
                          name='classifier')
    return logits, features


def exit_plan(stage_shapes: Sequence[Sequence[int]], stage: int) -> tuple[tuple[int, int], ...]:
  """`((width, stride), ...)`: the stages an exit after stage `stage` (0-based) walks through.

  One entry per later stage j: its width `d_j` and stride 2 where the backbone's height drops
  (`h_j < h_{j-1}`), else 1. For the last stage: one stride-1 entry at its own width (HSAKD's
  head on the final stage).
  """
  shapes = [_shape3(s) for s in stage_shapes]
  if stage == len(shapes) - 1:
    return ((shapes[-1][-1], 1),)
  return tuple((shapes[j][-1], 2 if shapes[j][0] < shapes[j - 1][0] else 1)
               for j in range(stage + 1, len(shapes)))


class Exits(nn.Module):
  """Auxiliary exits on the stages `exit_stages` of a backbone, with their adapters.

  Build with `make_exits`. Attributes are static, hashable descriptions:
    kind: 'byot' or 'hsakd'.
    stage_shapes: per-example `(h, w, d)` of every stage of the backbone.
    exit_stages: 0-based stages that get an exit, shallowest first.
    feature_dim: width of the backbone's `outputs['features']` (the adapters' output).
    num_outputs: logits width of every exit.
    attention, conv: `ByotExit` options ('byot').
    block, blocks_per_stage: `HsakdExit` options ('hsakd').
    adapters: a linear adapter per exit (else the exit features are returned as they are).
    rotations: joint-label factor of the logits (`num_outputs = rotations · C`; 1 for 'byot').
    dtype: computation dtype.
    init_scheme: initialisation scheme of every exit and adapter, one of `common.INIT_SCHEMES`.

  `__call__(stage_features, *, train, axis_name=None) -> (logits, adapted_features)`: tuples
  with one `[B, num_outputs]` and one `[B, feature_dim]` float32 array per exit, shallowest
  first. `stage_features` is the backbone's whole tuple (`outputs['stage_features']`).
  `axis_name`: the mesh axis for cross-device BatchNorm in train mode (None: local batch).
  """
  kind: str
  stage_shapes: tuple[tuple[int, int, int], ...]
  exit_stages: tuple[int, ...]
  feature_dim: int
  num_outputs: int
  attention: bool = False
  conv: str = 'sepconv'
  block: str = 'conv'
  blocks_per_stage: tuple[int, ...] = ()
  adapters: bool = True
  rotations: int = 1
  dtype: Any = jnp.float32
  init_scheme: str = 'flax'

  @property
  def num_exits(self) -> int:
    return len(self.exit_stages)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(f'exit{k + 1}' for k in range(self.num_exits))

  def init_variables(self, rng: jax.Array | None = None) -> dict[str, Any]:
    """`{'params', 'batch_stats'}`, initialised on zero stage maps of batch 1 (traceable)."""
    return init_exits(self, rng)

  @nn.compact
  def __call__(self, stage_features, *, train: bool, axis_name: str | None = None):
    if len(stage_features) != len(self.stage_shapes):
      raise ValueError(f"Exits: got {len(stage_features)} stage features, built for "
                       f"{len(self.stage_shapes)}")
    all_logits, all_features = [], []
    for k, stage in enumerate(self.exit_stages):
      plan = exit_plan(self.stage_shapes, stage)
      widths = tuple(w for w, _ in plan)
      strides = tuple(s for _, s in plan)
      name = f'exit{k + 1}'
      if self.kind == 'byot':
        exit_module = ByotExit(widths, strides, self.num_outputs, self.attention, self.conv,
                               self.dtype, self.init_scheme, name=name)
      else:
        if stage == len(self.stage_shapes) - 1:
          blocks = (self.blocks_per_stage[-1],)
        else:
          blocks = tuple(self.blocks_per_stage[stage + 1:])
        exit_module = HsakdExit(self.block, widths, strides, blocks, self.num_outputs,
                                self.dtype, self.init_scheme, name=name)
      logits, features = exit_module(stage_features[stage], train=train, axis_name=axis_name)
      if self.adapters:
        features = common.dense(features, self.feature_dim, init=self.init_scheme,
                                dtype=jnp.float32, name=f'adapter{k + 1}')
      all_logits.append(logits)
      all_features.append(features)
    return tuple(all_logits), tuple(all_features)


def _shape3(shape: Any) -> tuple[int, int, int]:
  shape = tuple(getattr(shape, 'shape', shape))
  if len(shape) < 3:
    raise ValueError(f"make_exits: a stage shape needs (h, w, d) at the end, got {shape}")
  return tuple(int(s) for s in shape[-3:])


def make_exits(kind: str, stage_shapes: Sequence[Any], feature_dim: int, num_classes: int, *,
               attention: bool | None = None, conv: str = 'sepconv', block: str = 'conv',
               blocks_per_stage: int | Sequence[int] = 1, include_last: bool | None = None,
               rotations: int = 4, adapters: bool = True, dtype: Any = jnp.float32,
               init: str = 'flax') -> Exits:
  """Builds the exits for a backbone from its stage shapes.

  Args:
    kind: 'byot' (`ByotExit`) or 'hsakd' (`HsakdExit`).
    stage_shapes: one per stage, shapes `(..., h, w, d)` or ShapeDtypeStructs (e.g.
      `stage_feature_shapes(model, image_shape)`); only the last three dims are used.
    feature_dim: width of the backbone's `outputs['features']`.
    num_classes: C. 'byot' exits predict C classes, 'hsakd' exits `rotations · C`.
    attention: BYOT's attention gate; default True for 'byot' (official); must be falsy for
      'hsakd'.
    conv: 'byot' block, 'sepconv' (official) or 'plain'.
    block: 'hsakd' stage-copy block: 'basic', 'preact', 'wide' or 'conv'
      (`backbone_exit_kwargs(model)` picks it for a model of this package).
    blocks_per_stage: 'hsakd' blocks per copied stage, an int or one per stage.
    include_last: also put an exit on the last stage; default False for 'byot' (the deepest
      "exit" is the backbone's own classifier), True for 'hsakd' (HSAKD's 4th head).
    rotations: joint-label factor of 'hsakd' exits (4: rotations by 0/90/180/270°).
    adapters: a linear adapter per exit to `feature_dim` (BYOT journal). False needs every
      exit's width (the last stage's) to equal `feature_dim`.
    dtype: computation dtype of the exits.
    init: initialisation scheme of the exits, one of `common.INIT_SCHEMES` (the
      backbone's `config.model.init`, as a rule).

  Raises:
    ValueError: on an unknown kind/conv/block/init, fewer than 2 stages without `include_last`,
      inconsistent sizes, or `adapters=False` with mismatched widths.
  """
  if kind not in EXIT_KINDS:
    raise ValueError(f"make_exits: kind={kind!r}; allowed: {', '.join(EXIT_KINDS)}")
  if conv not in BYOT_CONVS:
    raise ValueError(f"make_exits: conv={conv!r}; allowed: {', '.join(BYOT_CONVS)}")
  if block not in HSAKD_BLOCKS:
    raise ValueError(f"make_exits: block={block!r}; allowed: {', '.join(HSAKD_BLOCKS)}")
  if init not in common.INIT_SCHEMES:
    raise ValueError(f"make_exits: init={init!r}; allowed: {', '.join(common.INIT_SCHEMES)}")
  shapes = tuple(_shape3(s) for s in stage_shapes)
  if not shapes:
    raise ValueError("make_exits: no stage shapes")
  if feature_dim < 1 or num_classes < 1 or rotations < 1:
    raise ValueError("make_exits: feature_dim, num_classes and rotations must be >= 1")
  if attention is None:
    attention = kind == 'byot'
  if attention and kind != 'byot':
    raise ValueError("make_exits: attention gates exist only for kind='byot'")
  if include_last is None:
    include_last = kind == 'hsakd'
  exit_stages = tuple(range(len(shapes) if include_last else len(shapes) - 1))
  if not exit_stages:
    raise ValueError(f"make_exits: a backbone with {len(shapes)} stage(s) leaves no exit; "
                     "set include_last=True")
  if isinstance(blocks_per_stage, int):
    blocks_per_stage = (blocks_per_stage,) * len(shapes)
  blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
  if len(blocks_per_stage) != len(shapes) or min(blocks_per_stage) < 1:
    raise ValueError(f"make_exits: blocks_per_stage needs {len(shapes)} positive entries, "
                     f"got {blocks_per_stage}")
  if not adapters and shapes[-1][-1] != feature_dim:
    raise ValueError(f"make_exits: adapters=False needs exit width {shapes[-1][-1]} == "
                     f"feature_dim {feature_dim}")
  num_outputs = num_classes * (rotations if kind == 'hsakd' else 1)
  return Exits(kind=kind, stage_shapes=shapes, exit_stages=exit_stages,
               feature_dim=int(feature_dim), num_outputs=int(num_outputs),
               attention=bool(attention), conv=conv, block=block,
               blocks_per_stage=blocks_per_stage, adapters=bool(adapters),
               rotations=int(rotations) if kind == 'hsakd' else 1, dtype=dtype,
               init_scheme=init)


def backbone_exit_kwargs(model: nn.Module) -> dict[str, Any]:
  """`{'block', 'blocks_per_stage'}` for 'hsakd' exits copying this package's `model`."""
  if isinstance(model, CifarResNet):
    return {'block': 'basic', 'blocks_per_stage': tuple(model.stage_sizes)}
  if isinstance(model, RepDistillerResNet):
    return {'block': 'basic', 'blocks_per_stage': (model.depth - 2) // 6}
  if isinstance(model, PreActResNet):
    return {'block': 'preact', 'blocks_per_stage': tuple(model.stage_sizes)}
  if isinstance(model, WideResNet):
    return {'block': 'wide', 'blocks_per_stage': (model.depth - 4) // 6}
  return {'block': 'conv', 'blocks_per_stage': 1}


def stage_feature_shapes(model: nn.Module, image_shape: Sequence[int]
                         ) -> tuple[jax.ShapeDtypeStruct, ...]:
  """The model's `outputs['stage_features']` for one image, as ShapeDtypeStructs (no compute)."""
  return tuple(abstract_model(model, image_shape)[1]['stage_features'])


def init_exits(exits: Exits, rng: jax.Array | None = None) -> dict[str, Any]:
  """`{'params', 'batch_stats'}` of `exits`, initialised on zero stage maps of batch 1."""
  if rng is None:
    rng = jax.random.PRNGKey(0)
  dummy = tuple(jnp.zeros((1, *shape), jnp.float32) for shape in exits.stage_shapes)
  variables = exits.init({'params': rng}, dummy, train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
