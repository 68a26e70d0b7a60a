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


@pytest.mark.parametrize("key, value, message", [
    ("optimizer.momentum", 1.5, "config.optimizer.momentum=1.5 must be a number in [0.0, 1.0)"),
    ("optimizer.weight_decay", -1.0, "config.optimizer.weight_decay=-1.0 must be a number >= 0"),
    ("optimizer.warmup_epochs", -1.0, "config.optimizer.warmup_epochs=-1.0 must be a number"),
    ("optimizer.momentum", float("nan"), "config.optimizer.momentum=nan must be a number"),
    ("data.flip", 2, "config.data.flip=2 is not allowed; allowed: -1, 0, 1"),
    ("checkpoint_every_steps", -5, "config.checkpoint_every_steps=-5 must be an integer >= 0 "
                                   "(0 = at the end of every epoch)"),
    ("log_every_steps", 0, "config.log_every_steps=0 must be an integer >= 1"),
])
def test_values_a_run_used_to_accept_are_refused(key, value, message):
  """Each of these trained before: a negative weight decay or a momentum of 1.5 as given, a
  negative checkpoint interval as-is, log_every_steps 0 clamped to 1, flip 2 as 'on'."""
  config = load(os.path.join(REPO, "configs", "fashion_mnist", "ce.py")).get_config("smoke")
  config_check.check_config(config, num_devices=1)
  *parents, leaf = key.split(".")
  target = config
  for parent in parents:
    target = target[parent]
  target[leaf] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check_config(config, num_devices=1)
  assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("value", [-1, 3, 1.5])
def test_num_devices_outside_0_to_visible_is_refused(value):
  """-1 used to train on all but one device (devices[:-1]); with 2 devices visible."""
  from selfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"num_devices": value})
  with pytest.raises(config_check.ConfigError, match=rf"config.num_devices={value} must be 0 "
                                                     r"\(every visible device\) or 1\.\.2"):
    loop.select_devices(config, devices=["d0", "d1"])
  assert loop.select_devices(ml_collections.ConfigDict({"num_devices": 0}),
                             devices=["d0", "d1"]) == ["d0", "d1"]


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
  # Step s of the 10 warm-up steps trains at 0.1 * (s + 1) / 10 (Tf-KD's WarmUpLR).
  np.testing.assert_allclose(schedule(0), 0.01, rtol=1e-6)
  np.testing.assert_allclose(schedule(4), 0.05, rtol=1e-6)
  np.testing.assert_allclose(schedule(9), 0.1, rtol=1e-6)       # peak at the last warm-up step
  np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)      # the cosine starts at the peak
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
