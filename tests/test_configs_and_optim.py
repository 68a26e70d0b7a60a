"""Every config file loads, validates and documents its own launch command; LR schedules."""

import glob
import importlib.util
import inspect
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from selfkd_jax import methods
from selfkd_jax.train import config_check, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_config_file(path):
  module = load(path)
  relative = os.path.relpath(path, REPO)
  assert f"--config={relative}" in module.__doc__  # the launch command is in the docstring
  for arg in (None, "smoke"):
    config = module.get_config(arg)
    config_check.check_config(config, num_devices=1)
    if "teacher" in config:  # a smoke student trains its own smoke teacher in its workdir
      assert (config.teacher.workdir == "") == (arg == "smoke"), path
      if arg == "smoke":
        assert config.teacher.config.num_epochs == config.num_epochs, path
    for key in ("seed", "num_epochs", "batch_size", "method.name", "model.name", "data.name",
                "data.limit_train"):
      target = config
      for part in key.split("."):
        target = target[part]
  # The method file name is the method name (configs/<dataset>/<method>[_model].py).
  stem, name = os.path.basename(path).removesuffix(".py"), module.get_config().method.name
  assert stem == name or stem.startswith(name + "_"), (stem, name)


def test_cifar100_pskd_recipe_is_the_published_one():
  config = load(os.path.join(REPO, "configs", "cifar100", "pskd_preact_resnet18.py")).get_config()
  assert (config.num_epochs, config.batch_size, config.model.name) == (300, 128, "preact_resnet18")
  assert config.method.alpha_T == 0.8
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov, opt.weight_decay) == (
      "sgd", 0.1, 0.9, True, 5e-4)
  assert tuple(opt.milestones) == (150, 225) and opt.schedule == "multistep"
  assert (config.data.crop_padding, config.data.flip) == (4, 1)


def test_every_method_has_configs_and_fashion_mnist_shares_one_recipe():
  from selfkd_jax.train.method_factory import METHOD_NAMES
  reference = load(os.path.join(REPO, "configs", "fashion_mnist", "ce.py")).get_config()
  for name in METHOD_NAMES:
    path = os.path.join(REPO, "configs", "fashion_mnist", f"{name}.py")
    assert os.path.exists(path), f"{name} has no Fashion-MNIST config"
    twins = glob.glob(os.path.join(REPO, "configs", "cifar100", f"{name}_*.py"))
    assert any(load(t).get_config().method.name == name for t in twins), name
    config = load(path).get_config().to_dict()
    config.pop("method")
    teacher = config.pop("teacher", None)
    expected = reference.to_dict()
    expected.pop("method")
    assert config == expected, f"{name}: the Fashion-MNIST recipe differs from CE's"
    if teacher is not None:  # the KD family's teacher is the CE config itself
      assert teacher["config"] == reference.to_dict(), name


def test_cifar100_teacher_recipes():
  dkd = load(os.path.join(REPO, "configs", "cifar100", "dkd_wrn16_2.py")).get_config()
  assert (dkd.num_epochs, dkd.batch_size, dkd.optimizer.learning_rate) == (240, 64, 0.05)
  assert tuple(dkd.optimizer.milestones) == (150, 180, 210)
  assert (dkd.method.beta, dkd.method.warmup_epochs) == (8.0, 20.0)
  assert dkd.teacher.config.model.name == "preact_resnet18"
  tfkd_self = load(os.path.join(REPO, "configs", "cifar100", "tfkd_self_resnet18.py")).get_config()
  assert (tfkd_self.method.alpha, tfkd_self.method.temperature,
          tfkd_self.method.multiplier) == (0.95, 6.0, 50.0)
  teacher = tfkd_self.teacher.config
  assert (teacher.model.name, teacher.method.name) == ("resnet18", "ce")
  assert teacher.optimizer.to_dict() == tfkd_self.optimizer.to_dict()
  cskd = load(os.path.join(REPO, "configs", "cifar100", "cskd_preact_resnet18.py")).get_config()
  assert (cskd.num_epochs, cskd.optimizer.weight_decay, tuple(cskd.optimizer.milestones)) == (
      200, 1e-4, (100, 150))


def test_cifar100_tfkd_recipe_is_the_official_one():
  config = load(os.path.join(REPO, "configs", "cifar100", "tfkd_reg_resnet18.py")).get_config()
  assert (config.num_epochs, config.batch_size, config.model.name) == (200, 128, "resnet18")
  opt = config.optimizer
  assert (opt.learning_rate, opt.nesterov, opt.decay_factor, opt.warmup_epochs) == (
      0.1, False, 0.2, 1.0)
  assert tuple(opt.milestones) == (60, 120, 160)
  method = config.method
  assert (method.alpha, method.temperature, method.multiplier, method.correct_prob) == (
      0.1, 20.0, 100.0, 0.99)


def _opt(**values):
  base = dict(name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="multistep", milestones=(150, 225), decay_factor=0.1, warmup_epochs=0.0)
  return ml_collections.ConfigDict({**base, **values})


def test_multistep_milestones_are_epochs():
  steps_per_epoch = 391  # CIFAR: 50000 / 128
  schedule = optim.learning_rate_schedule(_opt(), steps_per_epoch, 300)
  for epoch, expected in [(0, 0.1), (149, 0.1), (150, 0.01), (224, 0.01), (225, 0.001),
                          (299, 0.001)]:
    np.testing.assert_allclose(schedule(epoch * steps_per_epoch), expected, rtol=1e-6)
  np.testing.assert_allclose(schedule(150 * steps_per_epoch - 1), 0.1, rtol=1e-6)


def test_warmup_then_cosine():
  schedule = optim.learning_rate_schedule(_opt(schedule="cosine", warmup_epochs=1.0), 10, 5)
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-8)
  np.testing.assert_allclose(schedule(5), 0.05, rtol=1e-6)      # half-way up the warm-up
  np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)      # peak after one epoch
  np.testing.assert_allclose(schedule(30), 0.05, rtol=1e-5)     # half-way down 40 cosine steps
  np.testing.assert_allclose(schedule(50), 0.0, atol=1e-7)


def test_sgd_weight_decay_is_added_to_the_gradient():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  tx, _ = optim.make_optimizer(_opt(momentum=0.0, nesterov=False, schedule="constant"), 10, 1)
  params = {"w": jnp.array([2.0, -1.0])}
  updates, _ = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(params), params)
  # PyTorch SGD: p -= lr * (g + wd * p)
  np.testing.assert_allclose(updates["w"], -0.1 * (np.array([0.5, 0.5]) + 5e-4 * np.array([2.0, -1.0])),
                             rtol=1e-6)


# The trainer's `config.method.*` keys that are written differently from the constructor's
# parameter (same meaning), and keys a config name fixes on purpose (a named variant).
_CONFIG_SPELLINGS = {"storage_dtype": {"float32": jnp.float32}, "aux_alpha_T": {0.0: None},
                     "feature_exits": {(): None}}
_VARIANT_KEYS = {("lsrkd_tc", "beta"), ("mrkd_tc", "tc")}


def test_config_defaults_are_the_constructors_defaults():
  """Defaults live in the constructors: every config key named like a constructor parameter has
  the constructor's default (a diverging default is how byot's feature_norm drifted)."""
  from selfkd_jax.train.method_factory import METHOD_BUILDERS
  constructors = {"ls": methods.label_smoothing, "lsrkd_tc": methods.lsrkd,
                  "mrkd_tc": methods.mrkd}
  checked = 0
  for name, (_, defaults) in METHOD_BUILDERS.items():
    constructor = constructors.get(name, getattr(methods, name, None))
    if constructor is None:
      continue
    parameters = inspect.signature(constructor).parameters
    for key, value in defaults.items():
      if key not in parameters or parameters[key].default is inspect.Parameter.empty:
        continue
      if (name, key) in _VARIANT_KEYS:
        assert value != parameters[key].default, (name, key)
        continue
      value = _CONFIG_SPELLINGS.get(key, {}).get(value, value)
      assert value == parameters[key].default, (name, key, value, parameters[key].default)
      checked += 1
  assert checked >= 50
