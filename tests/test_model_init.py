"""Initialisation schemes (`config.model.init`): 'flax', 'pytorch', 'kaiming_fan_out'.

Each check compares a sample statistic with its formula, with a tolerance of 5 standard errors
computed from the sample size (so it fails with probability < 1e-6 for a correct init, and
wrong fans or scales are off by far more): the sample std of n draws of a zero-mean variable
with variance σ² and fourth moment μ4 has a standard error of about sqrt((μ4 - σ⁴)/n) / (2σ).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from selfkd_jax import models
from selfkd_jax.models import common, exits
from selfkd_jax.train import config_check, default_config

SCHEMES = ('flax', 'pytorch', 'kaiming_fan_out')
# 'unsafe_rbg' keys compile several times faster on CPU than the default threefry (these tests
# only need independent, uniformly distributed bits; compiling `init` is most of their time).
KEY = jax.random.key(0, impl='unsafe_rbg')
# LeCun normal is a normal truncated at ±2 and rescaled to unit variance.
TRUNCATED_STD = 0.87962566103423978


def _assert_std(sample, expected_std, kurtosis):
  """Sample std == expected within 5 standard errors; mean 0 within 5 standard errors."""
  x = np.asarray(sample, np.float64).ravel()
  n = x.size
  se_std = math.sqrt((kurtosis - 1.0) / n) * expected_std / 2.0
  assert abs(x.std() - expected_std) < 5 * se_std, (x.std(), expected_std, se_std)
  assert abs(x.mean()) < 5 * expected_std / math.sqrt(n), (x.mean(), expected_std)


def _assert_normal(sample, std):
  _assert_std(sample, std, kurtosis=3.0)
  # Untruncated: among n ≥ 2,000 draws some lie beyond 2.5σ (P(none) = 0.988ⁿ < e⁻²⁴), while
  # flax's truncated normals (LeCun) have none beyond 2.27σ.
  assert np.size(sample) >= 2000
  assert np.abs(sample).max() > 2.5 * std


def _assert_uniform(sample, bound):
  x = np.abs(np.asarray(sample))
  assert x.max() <= bound
  assert x.max() > bound * (1 - 20.0 / x.size)  # n draws reach within ~bound/n of the edge
  _assert_std(sample, bound / math.sqrt(3.0), kurtosis=1.8)


def _assert_lecun(sample, fan_in):
  std = 1.0 / math.sqrt(fan_in)
  # The truncated normal's kurtosis is below 3; 3 gives a slightly wider (safe) tolerance.
  _assert_std(sample, std, kurtosis=3.0)
  assert np.abs(sample).max() <= 2.0 * std / TRUNCATED_STD * (1 + 1e-6)


class Layers(nn.Module):
  """A conv (64→256, 3×3, bias), a depthwise conv (1024 channels, bias) and a Dense (512→4096)."""
  init_scheme: str

  @nn.compact
  def __call__(self, conv_in, depthwise_in, dense_in):
    common.conv(conv_in, 256, 3, use_bias=True, init=self.init_scheme, name='conv')
    common.conv(depthwise_in, 1024, 3, use_bias=True, groups=1024, init=self.init_scheme,
                name='depthwise')
    common.dense(dense_in, 4096, init=self.init_scheme, name='dense')


@pytest.fixture(scope='module')
def layer_params():
  """The layers' parameters under each scheme (one compilation for all three)."""
  inputs = (jnp.zeros((1, 3, 3, 64)), jnp.zeros((1, 3, 3, 1024)), jnp.zeros((1, 512)))
  return jax.jit(lambda: {scheme: Layers(scheme).init(KEY, *inputs)['params']
                          for scheme in SCHEMES})()


@pytest.mark.parametrize('scheme', SCHEMES)
def test_layer_initialisers(scheme, layer_params):
  params = layer_params[scheme]
  conv, depthwise, dense = params['conv'], params['depthwise'], params['dense']
  assert conv['kernel'].shape == (3, 3, 64, 256)
  assert depthwise['kernel'].shape == (3, 3, 1, 1024)
  assert dense['kernel'].shape == (512, 4096)
  # Convs: fan_in = in/groups · 9 (576; 9 for the depthwise conv), fan_out = out · 9 (2,304;
  # 9,216), as PyTorch computes them from its weight [out, in/groups, kh, kw].
  if scheme == 'pytorch':
    _assert_uniform(conv['kernel'], 1 / math.sqrt(576))
    _assert_uniform(conv['bias'], 1 / math.sqrt(576))
    _assert_uniform(depthwise['kernel'], 1 / math.sqrt(9))
    _assert_uniform(depthwise['bias'], 1 / math.sqrt(9))
  else:
    _assert_normal(conv['kernel'], math.sqrt(2 / 2304))
    _assert_normal(depthwise['kernel'], math.sqrt(2 / 9216))
    np.testing.assert_array_equal(conv['bias'], 0.0)
    np.testing.assert_array_equal(depthwise['bias'], 0.0)
  # Dense: fan_in 512.
  if scheme == 'flax':
    _assert_lecun(dense['kernel'], 512)
    np.testing.assert_array_equal(dense['bias'], 0.0)
  else:
    _assert_uniform(dense['kernel'], 1 / math.sqrt(512))
    _assert_uniform(dense['bias'], 1 / math.sqrt(512))


def test_unknown_scheme_is_refused():
  with pytest.raises(ValueError, match="unknown init 'nope'; allowed: flax, pytorch, "
                                       "kaiming_fan_out"):
    models.get_model('mlp', num_classes=10, init='nope')
  with pytest.raises(ValueError, match="unknown init 'he'"):
    common.conv_init('he', in_features=3, kernel_size=3)
  assert models.INIT_SCHEMES == SCHEMES


def _init(model, shape):
  return jax.jit(lambda x: model.init(KEY, x, train=False))(jnp.zeros(shape))


def test_flax_is_the_default_and_todays_initialisation():
  """The default is 'flax', the initialisation of the runs made before the option existed:
  convs N(0, 2/fan_out), Dense layers LeCun normal with zero bias, BN scale 1 and bias 0.
  (That it is bit for bit the parameters of before was checked when the option came in.)"""
  default = models.get_model('lenet5_bn', num_classes=1000)
  for name in models.MODEL_NAMES:
    assert models.get_model(name, num_classes=10).init_scheme == 'flax', name
  assert default == models.get_model('lenet5_bn', num_classes=1000, init='flax')
  assert default != models.get_model('lenet5_bn', num_classes=1000, init='pytorch')
  params = _init(default, (1, 28, 28, 1))['params']
  _assert_normal(params['conv2']['kernel'], math.sqrt(2 / (25 * 16)))  # 5·5·6·16 = 2,400
  _assert_lecun(params['fc1']['kernel'], 400)
  _assert_lecun(params['classifier']['kernel'], 84)
  for name in ('fc1', 'fc2', 'classifier'):
    np.testing.assert_array_equal(params[name]['bias'], 0.0)
  for name in ('bn1', 'bn2'):
    np.testing.assert_array_equal(params[name]['scale'], 1.0)
    np.testing.assert_array_equal(params[name]['bias'], 0.0)


def test_kaiming_fan_out_follows_each_architectures_code():
  """Under 'kaiming_fan_out' the classifier is PyTorch's default Linear (their ResNets), with
  the bias zeroed for the WRN (mdistiller wrn.py) and N(0, 0.01²) / zero for the VGG (vgg.py).
  Small members of each family, 1000 classes so that the classifier has enough entries."""
  small = {
      'resnet': models.RepDistillerResNet(num_classes=1000, depth=8, widths=(4, 4, 4, 64),
                                          init_scheme='kaiming_fan_out'),
      'wrn': models.WideResNet(num_classes=1000, depth=10, width=1, conv_bias=False,
                               init_scheme='kaiming_fan_out'),
      'vgg': models.VGG(num_classes=1000, stages=((4,), (4,), (4,), (4,), (64,)),
                        init_scheme='kaiming_fan_out'),
  }
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.jit(lambda: {family: model.init(KEY, x, train=False)['params']
                            for family, model in small.items()})()
  classifiers = {family: p['classifier'] for family, p in params.items()}
  for family, classifier in classifiers.items():
    assert classifier['kernel'].shape == (64, 1000), family
  # Their convs: N(0, 2/fan_out) (resnet stage 3: 3·3·64 = 576; vgg block 5: the same).
  _assert_normal(params['resnet']['stage3_block1']['conv2']['kernel'], math.sqrt(2 / 576))
  _assert_normal(params['vgg']['stage5_conv1']['kernel'], math.sqrt(2 / 576))
  _assert_uniform(classifiers['resnet']['kernel'], 1 / 8)
  _assert_uniform(classifiers['resnet']['bias'], 1 / 8)
  _assert_uniform(classifiers['wrn']['kernel'], 1 / 8)
  np.testing.assert_array_equal(classifiers['wrn']['bias'], 0.0)
  _assert_normal(classifiers['vgg']['kernel'], 0.01)
  np.testing.assert_array_equal(classifiers['vgg']['bias'], 0.0)
  # The VGG's conv biases exist and start at zero (their `m.bias.data.zero_()`).
  for block in range(1, 6):
    conv = params['vgg'][f'stage{block}_conv1']
    assert conv['bias'].shape == conv['kernel'].shape[-1:]
    np.testing.assert_array_equal(conv['bias'], 0.0)


def test_exits_take_the_scheme():
  """BYOT's exits under its code's scheme: convs N(0, 2/fan_out), Linear layers PyTorch's."""
  stage_shapes = ((8, 8, 16), (4, 4, 64))
  heads = exits.make_exits('byot', stage_shapes, 64, 1000, init='kaiming_fan_out',
                           attention=False, conv='plain')
  assert exits.make_exits('byot', stage_shapes, 64, 1000).init_scheme == 'flax'
  params = jax.jit(lambda: heads.init_variables(KEY))()['params']
  _assert_normal(params['exit1']['block1']['conv']['kernel'], math.sqrt(2 / (9 * 64)))
  _assert_uniform(params['exit1']['classifier']['kernel'], 1 / 8)
  _assert_uniform(params['exit1']['classifier']['bias'], 1 / 8)
  _assert_uniform(params['adapter1']['kernel'], 1 / 8)
  with pytest.raises(ValueError, match="init='he'"):
    exits.make_exits('byot', stage_shapes, 64, 10, init='he')


def test_model_from_config_reads_init_and_defaults_to_flax():
  config = default_config.base_config()
  assert config.model.init == 'flax'
  config.model.init = 'pytorch'
  assert models.model_from_config(config.model, num_classes=10).init_scheme == 'pytorch'
  old = ml_collections.ConfigDict({'name': 'mlp', 'dtype': 'float32', 'num_classes': -1})
  assert models.model_from_config(old, num_classes=10).init_scheme == 'flax'


def test_config_check_refuses_an_unknown_init():
  config = default_config.base_config()
  config_check.check_config(config, num_devices=1)
  config.model.init = 'nope'
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check_config(config, num_devices=1)
  assert str(error.value) == ("config.model.init='nope' is not allowed; allowed: flax, pytorch, "
                              "kaiming_fan_out")


def test_a_workdir_config_without_init_is_the_same_run():
  """A config.json written before `model.init` existed compares equal to today's default
  (the run resumes); another scheme is another run. Also inside a student's teacher config."""
  current = default_config.base_config().to_dict()
  saved = default_config.base_config().to_dict()
  del saved['model']['init']
  assert config_check.comparable(saved) == config_check.comparable(current)
  other = default_config.base_config().to_dict()
  other['model']['init'] = 'pytorch'
  assert config_check.comparable(other) != config_check.comparable(current)

  student = {**default_config.base_config().to_dict(), 'teacher': {'config': current}}
  old_student = {**default_config.base_config().to_dict(), 'teacher': {'config': saved}}
  del old_student['model']['init']
  assert config_check.comparable(old_student) == config_check.comparable(student)
