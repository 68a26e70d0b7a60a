"""Tests for selfkd_jax.models: outputs, parameter counts, dtypes, BatchNorm.

ResNet-scale forward passes are slow on CPU, so shapes and parameter counts of the big
models come from `jax.eval_shape` (tracing only), and the numerical tests use batch 2
and, where the test does not depend on it, small images.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax import models
from selfkd_jax.models.resnet import PreActBlock
from selfkd_jax.models.wide_resnet import WideBasicBlock

MNIST_SHAPE = (2, 28, 28, 1)
CIFAR_SHAPE = (2, 32, 32, 3)
INPUT_SHAPE = {
    'mlp': MNIST_SHAPE, 'lenet5_bn': MNIST_SHAPE, 'resnet18': CIFAR_SHAPE,
    'preact_resnet18': CIFAR_SHAPE, 'wrn16_2': CIFAR_SHAPE, 'wrn28_10': CIFAR_SHAPE,
}
NUM_CLASSES = {name: 10 if shape == MNIST_SHAPE else 100
               for name, shape in INPUT_SHAPE.items()}
BN_MODELS = ('lenet5_bn', 'resnet18', 'preact_resnet18', 'wrn16_2', 'wrn28_10')
# Models cheap enough for a real forward pass on CPU in a unit test.
SMALL_MODELS = ('mlp', 'lenet5_bn', 'resnet18', 'preact_resnet18', 'wrn16_2')

# Expected (features, feature_map, stage_features) shapes at batch 2.
EXPECTED_SHAPES = {
    'mlp': ((2, 256), (2, 1, 1, 256), [(2, 1, 1, 256), (2, 1, 1, 256)]),
    'lenet5_bn': ((2, 84), (2, 5, 5, 16), [(2, 14, 14, 6), (2, 5, 5, 16)]),
    'resnet18': ((2, 512), (2, 4, 4, 512),
                 [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256), (2, 4, 4, 512)]),
    'preact_resnet18': ((2, 512), (2, 4, 4, 512),
                        [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256),
                         (2, 4, 4, 512)]),
    'wrn16_2': ((2, 128), (2, 8, 8, 128),
                [(2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 128)]),
    'wrn28_10': ((2, 640), (2, 8, 8, 640),
                 [(2, 32, 32, 160), (2, 16, 16, 320), (2, 8, 8, 640)]),
}


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _init(model, x, seed=0):
  """Random variables with the shapes and dtypes of `model.init`, made in numpy.

  Compiling `model.init` costs 5-10 s per model on CPU (mostly the threefry RNG);
  numpy is instant. The values are deliberately non-trivial (non-zero biases, BN
  scales != 1, running statistics != 0/1) so that a forgotten term shows up.
  """
  abstract = _abstract_variables(model, x.shape)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [str(getattr(k, 'key', k)) for k in path]
    shape, name = leaf.shape, names[-1]
    if name == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / math.prod(shape[:-1]))
    elif name == 'scale':
      value = 1.0 + 0.1 * rng.normal(size=shape)
    elif name == 'var':
      value = 1.0 + 0.1 * np.abs(rng.normal(size=shape))
    else:  # biases, running means
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


# The CIFAR-100 distillation benchmark's models (tests/test_kd_zoo_models.py).
KD_ZOO = ('wrn40_2', 'wrn16_2_nobias', 'resnet20', 'resnet56', 'resnet8x4', 'resnet32x4',
          'vgg8', 'vgg13')
# ImageNet ResNets (tests/test_imagenet_models.py).
IMAGENET = ('resnet50', 'resnet152')


def test_model_names():
  assert models.MODEL_NAMES == (
      'mlp', 'lenet5_bn', 'resnet18', 'preact_resnet18', 'wrn16_2', 'wrn28_10') + KD_ZOO + IMAGENET


def test_unknown_model_name():
  with pytest.raises(ValueError) as info:
    models.get_model('resnet9000', num_classes=10)
  assert str(info.value) == (
      "unknown model 'resnet9000'; allowed: mlp, lenet5_bn, resnet18, "
      "preact_resnet18, wrn16_2, wrn28_10, " + ", ".join(KD_ZOO + IMAGENET))


def test_fixed_architecture_fields_cannot_be_overridden():
  with pytest.raises(ValueError, match="'wrn16_2' fixes depth"):
    models.get_model('wrn16_2', num_classes=10, depth=28)


def test_get_model_passes_fields():
  model = models.get_model('wrn16_2', num_classes=7, dtype=jnp.bfloat16,
                           bn_axis_name='data', dropout_rate=0.3)
  assert isinstance(model, models.WideResNet)
  assert (model.num_classes, model.depth, model.width, model.dropout_rate,
          model.dtype, model.bn_axis_name) == (7, 16, 2, 0.3, jnp.bfloat16, 'data')


@pytest.mark.parametrize('name', tuple(INPUT_SHAPE))  # KD_ZOO: test_kd_zoo_models.py
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_shapes_and_dtypes(name, dtype):
  shape = INPUT_SHAPE[name]
  model = models.get_model(name, num_classes=NUM_CLASSES[name], dtype=dtype)
  variables = _abstract_variables(model, shape)
  for train in (False, True):
    outputs = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(shape), train=train,
                              mutable=['batch_stats'])[0], variables)
    expected_keys = {'logits', 'features', 'feature_map', 'stage_features'}
    if name != 'lenet5_bn':  # its feature map's depth is not the classifier's input width
      expected_keys.add('dense_logits')
    assert set(outputs) == expected_keys
    features, feature_map, stages = EXPECTED_SHAPES[name]
    assert outputs['logits'].shape == (2, NUM_CLASSES[name])
    assert outputs['features'].shape == features
    assert outputs['feature_map'].shape == feature_map
    assert isinstance(outputs['stage_features'], tuple)
    assert [s.shape for s in outputs['stage_features']] == stages
    for key in ('logits', 'features', 'feature_map'):
      assert outputs[key].dtype == jnp.float32, key
    # The stage maps stay in the computation dtype: proof that it is used.
    assert all(s.dtype == dtype for s in outputs['stage_features'])
  # Parameters and BatchNorm statistics are float32 whatever the computation dtype.
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert 'classifier' in variables['params']


# Parameter counts with 100 classes (10 for mlp/lenet). PyTorch-equivalent counts,
# i.e. trainable parameters only (BN scale and bias; running statistics excluded).
PARAMETER_COUNTS = [
    # mlp, 28×28×1, 10 classes: 784·256+256 = 200,960; 256·256+256 = 65,792;
    # 256·10+10 = 2,570 → 269,322.
    ('mlp', {}, 269_322),
    # lenet5_bn, 10 classes: conv1 5·5·1·6 = 150, BN 12, conv2 5·5·6·16 = 2,400,
    # BN 32, fc1 400·120+120 = 48,120, fc2 120·84+84 = 10,164, classifier 84·10+10 = 850
    # → 61,728 (ReffAKD's PyTorch model has conv biases: +6+16 = 61,750).
    ('lenet5_bn', {}, 61_728),
    # + BN on the two hidden Dense layers: 2·120 + 2·84 = 408.
    ('lenet5_bn', {'fc_batchnorm': True}, 62_136),
    # resnet18: stem 3·3·3·64 = 1,728 + BN 128;
    # stage 1: 2 × (2·(3·3·64·64 = 36,864) + 2·128) = 147,968;
    # stage 2: block 1 3·3·64·128 = 73,728 + 3·3·128·128 = 147,456 + 1×1 64·128 = 8,192
    #          + 3 BN·256 = 768 → 230,144; block 2 2·147,456 + 512 = 295,424 → 525,568;
    # stage 3: 294,912 + 589,824 + 32,768 + 1,536 = 919,040; 2·589,824 + 1,024
    #          = 1,180,672 → 2,099,712;
    # stage 4: 1,179,648 + 2,359,296 + 131,072 + 3,072 = 3,673,088; 2·2,359,296 + 2,048
    #          = 4,720,640 → 8,393,728;
    # classifier 512·100+100 = 51,300. Total 11,220,132.
    ('resnet18', {}, 11_220_132),
    # preact_resnet18 (PS-KD's CIFAR_ResNet18_preActBasic, hand count of the PyTorch
    # module): stem conv 1,728 + stem BN 128;
    # stage 1: 2 × (BN 128 + 36,864 + BN 128 + 36,864) = 147,968;
    # stage 2: block 1 BN(64) 128 + 73,728 + BN(128) 256 + 147,456 + 1×1 conv (no BN)
    #          8,192 = 229,760; block 2 256 + 147,456 + 256 + 147,456 = 295,424
    #          → 525,184;
    # stage 3: 256 + 294,912 + 512 + 589,824 + 32,768 = 918,272;
    #          512 + 589,824 + 512 + 589,824 = 1,180,672 → 2,098,944;
    # stage 4: 512 + 1,179,648 + 1,024 + 2,359,296 + 131,072 = 3,671,552;
    #          1,024 + 2,359,296 + 1,024 + 2,359,296 = 4,720,640 → 8,392,192;
    # no final BN; classifier 51,300. Total 11,217,444.
    ('preact_resnet18', {}, 11_217_444),
    # He et al. 2016 layout: no stem BN (−128), final BN over 512 (+1,024).
    ('preact_resnet18', {'layout': 'he2016'}, 11_218_340),
    # wrn16_2 (n = 2 blocks per group, widths 32/64/128, conv biases):
    # stem 3·3·3·16 + 16 = 448;
    # group 1: block 1 BN(16) 32 + (3·3·16·32 + 32 = 4,640) + BN 64 + (9,216 + 32)
    #          + 1×1 (16·32 + 32 = 544) = 14,528; block 2 64 + 9,248 + 64 + 9,248
    #          = 18,624 → 33,152;
    # group 2: block 1 64 + (18,432 + 64) + 128 + (36,864 + 64) + (2,048 + 64) = 57,728;
    #          block 2 128 + 36,928 + 128 + 36,928 = 74,112 → 131,840;
    # group 3: block 1 128 + (73,728 + 128) + 256 + (147,456 + 128) + (8,192 + 128)
    #          = 230,144; block 2 256 + 147,584 + 256 + 147,584 = 295,680 → 525,824;
    # final BN 256; classifier 128·100+100 = 12,900. Total 704,420.
    ('wrn16_2', {}, 704_420),
    # Without conv biases: 704,420 − (16 + 5·32 + 5·64 + 5·128 = 1,136) = 703,284.
    ('wrn16_2', {'conv_bias': False}, 703_284),
    # wrn28_10 (n = 4, widths 160/320/640, conv biases; the usual CIFAR-100 count):
    # stem 448;
    # group 1: block 1 32 + (23,040 + 160) + 320 + (230,400 + 160) + (2,560 + 160)
    #          = 256,832; blocks 2-4 3 × (320 + 230,560 + 320 + 230,560) = 1,385,280
    #          → 1,642,112;
    # group 2: block 1 320 + (460,800 + 320) + 640 + (921,600 + 320) + (51,200 + 320)
    #          = 1,435,520; blocks 2-4 3 × (640 + 921,920 + 640 + 921,920) = 5,535,360
    #          → 6,970,880;
    # group 3: block 1 640 + (1,843,200 + 640) + 1,280 + (3,686,400 + 640)
    #          + (204,800 + 640) = 5,738,240; blocks 2-4 3 × (1,280 + 3,687,040 + 1,280
    #          + 3,687,040) = 22,129,920 → 27,868,160;
    # final BN 1,280; classifier 640·100+100 = 64,100. Total 36,546,980.
    ('wrn28_10', {}, 36_546_980),
    # Without conv biases (the official code): −(16 + 9·160 + 9·320 + 9·640 = 10,096).
    ('wrn28_10', {'conv_bias': False}, 36_536_884),
]


@pytest.mark.parametrize('name,kwargs,expected', PARAMETER_COUNTS)
def test_parameter_count(name, kwargs, expected):
  model = models.get_model(name, num_classes=NUM_CLASSES[name], **kwargs)
  variables = _abstract_variables(model, INPUT_SHAPE[name])
  assert _count(variables['params']) == expected


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_features_feed_the_classifier(name):
  """logits == features @ kernel + bias; pooled feature_map == features."""
  shape = INPUT_SHAPE[name]
  model = models.get_model(name, num_classes=NUM_CLASSES[name])
  x = _images(shape)
  variables = _init(model, x)
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  kernel = np.asarray(variables['params']['classifier']['kernel'], np.float64)
  bias = np.asarray(variables['params']['classifier']['bias'], np.float64)
  features = np.asarray(outputs['features'], np.float64)
  logits = np.asarray(outputs['logits'])
  assert np.all(np.isfinite(logits)) and np.std(logits) > 1e-3
  np.testing.assert_allclose(features @ kernel + bias, logits, rtol=1e-5, atol=1e-5)
  if name != 'lenet5_bn':  # LeNet's feature_map is its last conv block, not pooled.
    feature_map = np.asarray(outputs['feature_map'], np.float64)
    np.testing.assert_allclose(feature_map.mean(axis=(1, 2)), features,
                               rtol=1e-5, atol=1e-5)
    # Zipf's dense logits: the classifier at every position; by linearity their
    # spatial mean is the logits.
    dense_logits = feature_map @ kernel + bias
    np.testing.assert_allclose(dense_logits.mean(axis=(1, 2)), logits,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_lenet_is_close_to_float32():
  x = _images(MNIST_SHAPE)
  fp32 = models.get_model('lenet5_bn', num_classes=10)
  bf16 = models.get_model('lenet5_bn', num_classes=10, dtype=jnp.bfloat16)
  variables = _init(fp32, x)

  @jax.jit
  def both(v, x):
    return {train: (fp32.apply(v, x, train=train, mutable=['batch_stats'])[0],
                    bf16.apply(v, x, train=train, mutable=['batch_stats'])[0])
            for train in (False, True)}

  params = variables['params']['classifier']
  for out32, out16 in both(variables, x).values():
    assert out16['logits'].dtype == jnp.float32
    assert out16['stage_features'][0].dtype == jnp.bfloat16
    assert not np.array_equal(out16['logits'], out32['logits'])  # really bf16
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%) through 4 layers.
    np.testing.assert_allclose(out16['logits'], out32['logits'], rtol=0.05, atol=0.05)
    # The classifier runs in float32 on the upcast features: exact in bf16 too.
    np.testing.assert_allclose(
        out16['features'] @ params['kernel'] + params['bias'], out16['logits'],
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['mlp', 'lenet5_bn'])
def test_real_init(name):
  """`model.init` itself (the other tests build variables in numpy)."""
  model = models.get_model(name, num_classes=10, dtype=jnp.bfloat16)
  x = _images(MNIST_SHAPE)
  # The 'rbg' key compiles much faster on CPU than the default threefry.
  variables = jax.jit(lambda x: model.init(
      jax.random.key(0, impl='rbg'), x, train=False))(x)
  abstract = _abstract_variables(model, MNIST_SHAPE)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32 and np.all(np.isfinite(leaf))
  if 'batch_stats' in variables:
    for bn in variables['batch_stats'].values():
      np.testing.assert_array_equal(bn['mean'], 0.0)
      np.testing.assert_array_equal(bn['var'], 1.0)


# Models with BatchNorm at small image sizes (the statistics logic does not depend on
# the size; the models pool globally).
BN_SMALL_INPUT = {
    'lenet5_bn': (2, 28, 28, 1), 'resnet18': (2, 8, 8, 3),
    'preact_resnet18': (2, 8, 8, 3), 'wrn16_2': (2, 8, 8, 3),
}


@pytest.mark.parametrize('name', sorted(BN_SMALL_INPUT))
def test_batch_stats_update_only_in_training(name):
  shape = BN_SMALL_INPUT[name]
  model = models.get_model(name, num_classes=10)
  x = _images(shape, seed=1) * 3.0 + 1.0
  variables = _init(model, x)
  stats = variables['batch_stats']
  apply = jax.jit(lambda v, x, train: model.apply(v, x, train=train,
                                                  mutable=['batch_stats']),
                  static_argnames='train')
  _, eval_updates = apply(variables, x, train=False)
  _, train_updates = apply(variables, x, train=True)
  flat_stats = flax.traverse_util.flatten_dict(stats)
  flat_eval = flax.traverse_util.flatten_dict(eval_updates['batch_stats'])
  flat_train = flax.traverse_util.flatten_dict(train_updates['batch_stats'])
  assert flat_stats.keys() == flat_eval.keys() == flat_train.keys()
  for path, before in flat_stats.items():
    np.testing.assert_array_equal(flat_eval[path], before, err_msg=str(path))
    assert not np.allclose(flat_train[path], before), path


def test_mlp_has_no_batch_stats():
  model = models.get_model('mlp', num_classes=10)
  assert set(_init(model, _images(MNIST_SHAPE))) == {'params'}


@pytest.mark.cross_device
@pytest.mark.parametrize('name', sorted(BN_SMALL_INPUT))
def test_batch_norm_reduces_across_devices(name):
  """Under shard_map with bn_axis_name='data', the BatchNorm statistics (and the
  train-mode outputs) are those of the global batch, as in a 1-device call."""
  num_devices = 4
  assert jax.device_count() >= num_devices
  mesh = jax.make_mesh((num_devices,), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  shape = (8,) + BN_SMALL_INPUT[name][1:]
  # Per-device batches with different statistics, so that a per-device reduction
  # gives visibly different running averages.
  x = _images(shape, seed=2) + jnp.arange(8.0).reshape(8, 1, 1, 1)

  single = models.get_model(name, num_classes=10)
  variables = _init(single, x)
  ref_outputs, ref_updates = jax.jit(
      lambda v, x: single.apply(v, x, train=True, mutable=['batch_stats']))(
          variables, x)

  def sharded_call(model, stats_spec, per_device_stats):
    def step(v, x):
      outputs, updates = model.apply(v, x, train=True, mutable=['batch_stats'])
      if per_device_stats:
        updates = jax.tree.map(lambda a: a[None], updates)
      return outputs['logits'], updates
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')),
                               out_specs=(P('data'), stats_spec)))
    v = jax.device_put(variables, NamedSharding(mesh, P()))
    xs = jax.device_put(x, NamedSharding(mesh, P('data')))
    return fn(v, xs)

  synced = models.get_model(name, num_classes=10, bn_axis_name='data')
  logits, updates = sharded_call(synced, P(), per_device_stats=False)
  flat_ref = flax.traverse_util.flatten_dict(ref_updates['batch_stats'])
  flat = flax.traverse_util.flatten_dict(updates['batch_stats'])
  assert flat.keys() == flat_ref.keys()
  # Float32; only the summation order differs (per-device means, then pmean).
  for path in flat_ref:
    roundoff.assert_close_to_scale(flat[path], flat_ref[path], roundoff.STEP_RTOL,
                                   err_msg=str(path))
  roundoff.assert_close_to_scale(logits, ref_outputs['logits'], roundoff.DEEP_FORWARD_RTOL)

  if name != 'lenet5_bn':
    return
  # Control (once; the input shift below makes it hold for every model): without
  # the axis name each device keeps its own statistics, which differ from the
  # global ones. This is what the assertions above rule out.
  local = models.get_model(name, num_classes=10)
  _, local_updates = sharded_call(local, P('data'), per_device_stats=True)
  flat_local = flax.traverse_util.flatten_dict(local_updates['batch_stats'])
  for path in flat_ref:
    assert flat_local[path].shape == (num_devices,) + flat_ref[path].shape
    assert not np.allclose(np.asarray(flat_local[path])[0], flat_ref[path],
                           rtol=1e-3, atol=1e-4), path


def test_wrn_dropout():
  x = _images((2, 8, 8, 3))
  model = models.get_model('wrn16_2', num_classes=10, dropout_rate=0.3)
  variables = _init(model, x)  # train=False: no 'dropout' rng needed
  apply = jax.jit(lambda v, x, key: model.apply(
      v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])[0]['logits'])
  a = apply(variables, x, jax.random.key(1, impl='rbg'))
  b = apply(variables, x, jax.random.key(2, impl='rbg'))
  np.testing.assert_array_equal(a, apply(variables, x, jax.random.key(1, impl='rbg')))
  assert not np.allclose(a, b)
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']),
                   variables)
  # Evaluation is deterministic and needs no rng.
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
  assert not np.allclose(evaluate(variables, x), a)


def test_wrn_depth_must_be_6n_plus_4():
  model = models.WideResNet(num_classes=10, depth=20, width=1)
  with pytest.raises(ValueError, match='6n\\+4'):
    _abstract_variables(model, (1, 8, 8, 3))


def test_preact_unknown_layout():
  model = models.get_model('preact_resnet18', num_classes=10, layout='v3')
  with pytest.raises(ValueError, match="unknown layout 'v3'"):
    _abstract_variables(model, (1, 8, 8, 3))


def _block_variables(block, x):
  """numpy variables (see `_init`) with the residual branch's last conv zeroed, so
  that the block returns its shortcut."""
  variables = _init(block, x)
  params = dict(variables['params'])
  params['conv2'] = jax.tree.map(jnp.zeros_like, params['conv2'])
  return {**variables, 'params': params}


def _eval_preact(variables, x):
  """relu(bn1(x)) in eval mode, from the running statistics."""
  bn, stats = variables['params']['bn1'], variables['batch_stats']['bn1']
  x = (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5)
  return jax.nn.relu(x * bn['scale'] + bn['bias'])


@pytest.mark.parametrize('identity_from_preactivation', [True, False])
def test_preact_block_identity_shortcut(identity_from_preactivation):
  """PS-KD's PreActBlock adds relu(bn1(x)) on its identity path; He et al. add x."""
  block = PreActBlock(8, 1, identity_from_preactivation, jnp.float32, None)
  x = _images((2, 4, 4, 8), seed=3)
  variables = _block_variables(block, x)
  y = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
  preact = _eval_preact(variables, x)
  expected = preact if identity_from_preactivation else x
  assert not np.allclose(preact, x)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_wide_block_shortcuts():
  """Identity from the raw input; projection from the pre-activated input."""
  x = _images((2, 4, 4, 8), seed=4)
  same = WideBasicBlock(8, 1, 0.0, True, jnp.float32, None)
  proj = WideBasicBlock(16, 2, 0.0, True, jnp.float32, None)
  same_vars, proj_vars = _block_variables(same, x), _block_variables(proj, x)

  @jax.jit
  def apply(same_vars, proj_vars, x):
    return (same.apply(same_vars, x, train=False),
            proj.apply(proj_vars, x, train=False))

  y_same, y_proj = apply(same_vars, proj_vars, x)
  np.testing.assert_allclose(y_same, x, rtol=1e-5, atol=1e-5)
  shortcut = proj_vars['params']['shortcut_conv']
  preact = _eval_preact(proj_vars, x)
  expected = (np.einsum('bhwc,cd->bhwd', preact[:, ::2, ::2],
                        shortcut['kernel'][0, 0]) + shortcut['bias'])
  np.testing.assert_allclose(y_proj, expected, rtol=1e-5, atol=1e-5)
