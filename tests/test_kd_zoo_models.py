"""The CIFAR-100 distillation benchmark's models (RepDistiller / mdistiller model zoo).

Everything here is abstract (`jax.eval_shape`: tracing, no initialisation, no compute), so the
file runs in a few seconds. The parameter counts are those of the official PyTorch models with
100 classes, counted by instantiating HobbitLong/RepDistiller `models/{resnet,wrn,vgg}.py` and
megvii-research/mdistiller `mdistiller/models/cifar/{resnet,wrn,vgg}.py` (identical networks)
and summing `p.numel()` over `parameters()`. Our models were also checked numerically against
those definitions (official weights copied in, eval-mode logits equal to float32 round-off),
which needs PyTorch and is not part of this suite.
"""
import math

import flax
import jax
import jax.numpy as jnp
import pytest

from selfkd_jax import models
from selfkd_jax.models import exits

IMAGE = (32, 32, 3)

# name -> PyTorch `sum(p.numel() for p in model.parameters())` at num_classes=100.
OFFICIAL_PARAMETER_COUNTS = {
    'resnet20': 278_324,        # resnet20()
    'resnet56': 861_620,        # resnet56()
    'resnet8x4': 1_233_540,     # resnet8x4()
    'resnet32x4': 7_433_860,    # resnet32x4()
    'wrn40_2': 2_255_156,       # wrn_40_2()
    'wrn16_2_nobias': 703_284,  # wrn_16_2()
    'vgg8': 3_965_028,          # vgg8_bn()
    'vgg13': 9_462_180,         # vgg13_bn()
}

# (features, feature_map, stage_features) per example at 32×32.
EXPECTED_SHAPES = {
    'resnet20': ((64,), (8, 8, 64), [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    'resnet56': ((64,), (8, 8, 64), [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    'resnet8x4': ((256,), (8, 8, 256), [(32, 32, 64), (16, 16, 128), (8, 8, 256)]),
    'resnet32x4': ((256,), (8, 8, 256), [(32, 32, 64), (16, 16, 128), (8, 8, 256)]),
    'wrn40_2': ((128,), (8, 8, 128), [(32, 32, 32), (16, 16, 64), (8, 8, 128)]),
    'wrn16_2_nobias': ((128,), (8, 8, 128), [(32, 32, 32), (16, 16, 64), (8, 8, 128)]),
    # Their pool3 runs only on 64-pixel inputs: blocks 4 and 5 both at 4×4.
    'vgg8': ((512,), (4, 4, 512),
             [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
    'vgg13': ((512,), (4, 4, 512),
              [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
}


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _flat_shapes(tree):
  return {'/'.join(path): tuple(leaf.shape)
          for path, leaf in flax.traverse_util.flatten_dict(tree).items()}


def test_the_zoo_is_registered():
  assert set(OFFICIAL_PARAMETER_COUNTS) <= set(models.MODEL_NAMES)


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMETER_COUNTS))
def test_parameter_count_and_outputs(name):
  variables, outputs = models.abstract_model(
      models.get_model(name, num_classes=100, dtype=jnp.bfloat16), IMAGE)
  assert _count(variables['params']) == OFFICIAL_PARAMETER_COUNTS[name]
  features, feature_map, stages = EXPECTED_SHAPES[name]
  assert outputs['logits'].shape == (1, 100)
  assert outputs['features'].shape == (1, *features)
  assert outputs['feature_map'].shape == (1, *feature_map)
  assert outputs['dense_logits'].shape == (1, *feature_map[:2], 100)
  assert [s.shape[1:] for s in outputs['stage_features']] == stages
  for key in ('logits', 'features', 'feature_map', 'dense_logits'):
    assert outputs[key].dtype == jnp.float32, key
  assert all(s.dtype == jnp.bfloat16 for s in outputs['stage_features'])
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  # BatchNorm running statistics are not parameters (PyTorch buffers), one pair per BN.
  flat = _flat_shapes(variables['params'])
  num_bn = sum(path.endswith('/scale') for path in flat)
  assert num_bn > 0 and _count(variables['batch_stats']) == sum(
      2 * shape[0] for path, shape in flat.items() if path.endswith('/scale'))


def test_resnet_layout():
  """resnet20 by hand: 16·27 stem; stage 1 (16→16) identity shortcuts only; stages 2 and 3 a
  1×1 conv + BN projection in their first block; no conv biases; fc 64→100 with bias."""
  params = _flat_shapes(models.variable_shapes(
      models.get_model('resnet20', num_classes=100), IMAGE)['params'])
  assert params['stem_conv/kernel'] == (3, 3, 3, 16)
  shortcuts = sorted(p for p in params if 'shortcut_conv' in p)
  assert shortcuts == ['stage2_block1/shortcut_conv/kernel', 'stage3_block1/shortcut_conv/kernel']
  assert params['stage2_block1/shortcut_conv/kernel'] == (1, 1, 16, 32)
  assert params['stage3_block1/shortcut_bn/scale'] == (64,)
  assert params['stage3_block3/conv2/kernel'] == (3, 3, 64, 64)
  assert not any(p.endswith('/bias') and 'conv' in p for p in params)
  assert params['classifier/kernel'] == (64, 100) and params['classifier/bias'] == (100,)
  # Hand count: stem 432 + BN 32; stage 1: 3 × 2 × (2,304 + 32) = 14,016; stage 2: first block
  # 4,608 + 9,216 + 512 + 3 BN·64 = 14,528, two more 2 × 2 × (9,216 + 64) = 37,120; stage 3:
  # 18,432 + 36,864 + 2,048 + 3 BN·128 = 57,728, two more 2 × 2 × (36,864 + 128) = 147,968;
  # fc 6,500.
  assert 432 + 32 + 14_016 + 14_528 + 37_120 + 57_728 + 147_968 + 6_500 == 278_324

  # resnet8x4: stem 32 channels, stage 1 at 64: its first block projects (stride 1).
  params = _flat_shapes(models.variable_shapes(
      models.get_model('resnet8x4', num_classes=100), IMAGE)['params'])
  assert params['stage1_block1/shortcut_conv/kernel'] == (1, 1, 32, 64)
  assert sorted(p.split('/')[0] for p in params if p.endswith('shortcut_conv/kernel')) == [
      'stage1_block1', 'stage2_block1', 'stage3_block1']


def test_vgg_layout():
  """vgg13: two convs per block, each with a bias and a BN; no hidden Linear layers."""
  params = _flat_shapes(models.variable_shapes(
      models.get_model('vgg13', num_classes=100), IMAGE)['params'])
  convs = [p for p in params if p.endswith('/kernel') and 'conv' in p]
  assert len(convs) == 10
  assert params['stage1_conv1/kernel'] == (3, 3, 3, 64)
  assert params['stage1_conv1/bias'] == (64,)
  assert params['stage4_conv1/kernel'] == (3, 3, 256, 512)
  assert params['stage5_bn2/scale'] == (512,)
  assert params['classifier/kernel'] == (512, 100)
  assert len([p for p in params if p.endswith('/kernel')]) == 11
  # vgg8 by hand: convs (1,728 + 64) + (73,728 + 128) + (294,912 + 256) + (1,179,648 + 512)
  # + (2,359,296 + 512), BN 2 · 1,472, fc 51,300.
  assert (1_792 + 73_856 + 295_168 + 1_180_160 + 2_359_808 + 2_944 + 51_300
          == OFFICIAL_PARAMETER_COUNTS['vgg8'])


def test_vgg_pools_after_block_4_only_on_64_pixel_inputs():
  model = models.get_model('vgg8', num_classes=10)
  stages = models.abstract_model(model, (64, 64, 3))[1]['stage_features']
  assert [s.shape[1] for s in stages] == [64, 32, 16, 8, 4]


def test_wrn_variants():
  """wrn16_2 keeps its conv biases (existing configs); the benchmark's WRNs have none."""
  def params(name):
    return _flat_shapes(models.variable_shapes(
        models.get_model(name, num_classes=100), IMAGE)['params'])

  with_bias, without = params('wrn16_2'), params('wrn16_2_nobias')
  assert set(without) == {p for p in with_bias if not (p.endswith('/bias') and 'conv' in p)}
  assert sum(map(math.prod, with_bias.values())) - sum(map(math.prod, without.values())) == (
      16 + 5 * 32 + 5 * 64 + 5 * 128)
  wrn40 = params('wrn40_2')
  assert len([p for p in wrn40 if p.endswith('conv1/kernel') and p.startswith('group')]) == 18
  assert not any(p.endswith('/bias') and 'conv' in p for p in wrn40)
  with pytest.raises(ValueError, match="'wrn40_2' fixes conv_bias"):
    models.get_model('wrn40_2', num_classes=100, conv_bias=True)


def test_depth_checks():
  with pytest.raises(ValueError, match='6n\\+2'):
    models.abstract_model(models.RepDistillerResNet(num_classes=10, depth=22), IMAGE)
  with pytest.raises(ValueError, match='five non-empty blocks'):
    models.abstract_model(models.VGG(num_classes=10, stages=((64,),) * 4), IMAGE)


def test_hsakd_exits_copy_the_basic_blocks():
  model = models.get_model('resnet56', num_classes=100)
  assert exits.backbone_exit_kwargs(model) == {'block': 'basic', 'blocks_per_stage': 9}
