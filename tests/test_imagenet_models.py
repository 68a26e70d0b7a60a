"""ImageNet ResNet-50 / ResNet-152 (`BottleneckResNet`): counts, shapes, strides, padding.

The full-size models are only traced (`jax.eval_shape`: no initialisation, no compute). The
parameter counts are PyTorch's `sum(p.numel() for p in model.parameters())` at 1000 classes
for torchvision's `resnet50()` / `resnet152()` and for PS-KD's ImageNet network
(lgcnsai/PS-KD-Pytorch `models/resnet_imagenet.py`, `ResNet('imagenet', depth, 1000)`),
which are equal. ResNet-50 was also checked numerically against torchvision (its weights
copied in, eval-mode logits equal to ~1e-6 relative), which needs PyTorch and is not part
of this suite. The numerical tests here run a tiny member of the family (one block per stage).
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import models
from selfkd_jax.models import exits

IMAGE = (224, 224, 3)
KEY = jax.random.key(0, impl='unsafe_rbg')  # compiles faster on CPU than threefry

# name -> (parameters, BatchNorm running statistics) at 1000 classes, torchvision = PS-KD.
TORCH_COUNTS = {
    'resnet50': (25_557_032, 53_120),
    'resnet152': (60_192_808, 151_424),
}
# torchvision: conv1 + bn1, layer1 ... layer4, fc.
STAGE_COUNTS = {
    'resnet50': (9_536, 215_808, 1_219_584, 7_098_368, 14_964_736, 2_049_000),
    'resnet152': (9_536, 215_808, 2_339_840, 40_613_888, 14_964_736, 2_049_000),
}
STAGE_SIZES = {'resnet50': (3, 4, 6, 3), 'resnet152': (3, 8, 36, 3)}


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module', params=tuple(TORCH_COUNTS))
def abstract(request):
  """(name, abstract variables, abstract eval-mode outputs) at 1000 classes, 224×224."""
  name = request.param
  model = models.get_model(name, num_classes=1000)
  variables, outputs = models.abstract_model(model, IMAGE)
  return name, variables, outputs


def test_registered():
  assert {'resnet50', 'resnet152'} <= set(models.MODEL_NAMES)
  for name, sizes in STAGE_SIZES.items():
    model = models.get_model(name, num_classes=1000, init='kaiming_fan_out')
    assert isinstance(model, models.BottleneckResNet)
    assert tuple(model.stage_sizes) == sizes
    assert (model.init_scheme, model.zero_init_residual) == ('kaiming_fan_out', False)
  with pytest.raises(ValueError, match="'resnet50' fixes stage_sizes"):
    models.get_model('resnet50', num_classes=10, stage_sizes=(1, 1, 1, 1))
  # HSAKD exits have no bottleneck block kind: the fallback for models without one.
  assert exits.backbone_exit_kwargs(models.get_model('resnet50', num_classes=10)) == {
      'block': 'conv', 'blocks_per_stage': 1}


def test_parameter_counts_equal_torchvision_and_pskd(abstract):
  name, variables, _ = abstract
  params, stats = TORCH_COUNTS[name]
  assert _count(variables['params']) == params
  assert _count(variables['batch_stats']) == stats
  p = variables['params']
  stem, *stages, fc = STAGE_COUNTS[name]
  assert _count(p['stem_conv']) + _count(p['stem_bn']) == stem
  for i, (blocks, expected) in enumerate(zip(STAGE_SIZES[name], stages)):
    names = {key for key in p if key.startswith(f'stage{i + 1}_')}
    assert names == {f'stage{i + 1}_block{j + 1}' for j in range(blocks)}
    assert sum(_count(p[key]) for key in names) == expected
  assert _count(p['classifier']) == fc
  assert p['classifier']['kernel'].shape == (2048, 1000)
  assert p['classifier']['bias'].shape == (1000,)
  # Projection (1×1 conv + BN) only in the first block of each stage; no conv biases.
  for key, block in p.items():
    if key.startswith('stage'):
      assert ('shortcut_conv' in block) == key.endswith('_block1'), key
      assert [set(block[c]) for c in ('conv1', 'conv2', 'conv3')] == [{'kernel'}] * 3


def test_output_shapes(abstract):
  _, _, outputs = abstract
  assert set(outputs) == {'logits', 'features', 'feature_map', 'stage_features',
                          'dense_logits'}
  assert outputs['logits'].shape == (1, 1000)
  assert outputs['features'].shape == (1, 2048)
  assert outputs['feature_map'].shape == (1, 7, 7, 2048)
  assert outputs['dense_logits'].shape == (1, 7, 7, 1000)
  assert [s.shape for s in outputs['stage_features']] == [
      (1, 56, 56, 256), (1, 28, 28, 512), (1, 14, 14, 1024), (1, 7, 7, 2048)]


def test_bfloat16_computes_in_bfloat16_with_float32_logits():
  model = models.get_model('resnet50', num_classes=1000, dtype=jnp.bfloat16)
  variables, outputs = models.abstract_model(model, (64, 64, 3))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert outputs['logits'].dtype == jnp.float32
  assert all(s.dtype == jnp.bfloat16 for s in outputs['stage_features'])


def test_stride_sits_on_the_3x3_conv():
  """torchvision v1.5 / PS-KD: a downsampling block's 1×1 conv1 keeps the resolution,
  its 3×3 conv2 and projection halve it; the max-pool halves the stem's output."""
  model = models.get_model('resnet50', num_classes=1000)
  variables = models.variable_shapes(model, IMAGE)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=['intermediates']),
      variables, jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32))
  inter = flax.traverse_util.flatten_dict(state['intermediates'])
  shape = lambda *path: inter[(*path, '__call__')][0].shape[1:]
  assert shape('stem_conv') == (112, 112, 64)
  assert shape('stage1_block1', 'conv1') == (56, 56, 64)  # after the max-pool
  for stage, (size, width) in enumerate(((56, 128), (28, 256), (14, 512)), start=2):
    block = f'stage{stage}_block1'
    assert shape(block, 'conv1') == (size, size, width)
    assert shape(block, 'conv2') == (size // 2, size // 2, width)
    assert shape(block, 'conv3') == (size // 2, size // 2, 4 * width)
    assert shape(block, 'shortcut_conv') == (size // 2, size // 2, 4 * width)


@pytest.fixture(scope='module')
def tiny():
  """A one-block-per-stage member on a 32×32 image with a single bright pixel at (0, 0),
  zero-initialised residual BNs: variables and the captured intermediates (one compile)."""
  model = models.BottleneckResNet(num_classes=5, stage_sizes=(1, 1, 1, 1),
                                  zero_init_residual=True)
  x = jnp.zeros((1, 32, 32, 3)).at[0, 0, 0, 0].set(1.0)

  def run(x):
    variables = model.init(KEY, x, train=False)
    outputs, state = model.apply(variables, x, train=False, capture_intermediates=True,
                                 mutable=['intermediates'])
    return variables, outputs, state['intermediates']

  return jax.jit(run)(x)


def test_stem_pads_like_pytorch(tiny):
  """PyTorch's 7×7/2 conv with padding 3 centres output (0, 0) on input (0, 0), so a lone
  input pixel there is seen by the kernel's centre tap (flax 'SAME' would pad (2, 3))."""
  variables, _, inter = tiny
  kernel = np.asarray(variables['params']['stem_conv']['kernel'])
  stem = np.asarray(inter['stem_conv']['__call__'][0])
  np.testing.assert_allclose(stem[0, 0, 0], kernel[3, 3, 0], rtol=1e-6)
  np.testing.assert_allclose(stem[0, 0, 1], kernel[3, 1, 0], rtol=1e-6)
  np.testing.assert_allclose(stem[0, 1, 1], kernel[1, 1, 0], rtol=1e-6)
  assert np.all(stem[0, 2:] == 0) and np.all(stem[0, :, 2:] == 0)


def test_zero_init_residual_starts_every_block_as_its_shortcut(tiny):
  variables, outputs, inter = tiny
  params = variables['params']
  for stage in range(1, 5):
    block = params[f'stage{stage}_block1']
    np.testing.assert_array_equal(block['bn3']['scale'], 0.0)
    for bn in ('bn1', 'bn2', 'shortcut_bn'):
      np.testing.assert_array_equal(block[bn]['scale'], 1.0)
    shortcut = inter[f'stage{stage}_block1']['shortcut_bn']['__call__'][0]
    np.testing.assert_array_equal(outputs['stage_features'][stage - 1],
                                  jax.nn.relu(shortcut))
  default = models.get_model('resnet50', num_classes=10)
  assert not default.zero_init_residual
