"""The trainer in-process: device-count independence, pmap == shard_map, no retrace, errors."""

import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import roundoff
from selfkd_jax.train import loop
from selfkd_jax.train.config_check import ConfigError
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def tiny_config(**overrides):
  """PS-KD on 512 Fashion-MNIST images, 2 epochs of 8 steps: BatchNorm, tables, eval, all of it."""
  config = fashion_mnist_recipe()
  config.method = method_config("pskd")
  config.num_epochs = 2
  config.batch_size = 64
  config.data.limit_train = 512
  config.progress_bar = False
  config.log_every_steps = 4
  config.eval_batch_size = 1000
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def final_state(workdir):
  """The last checkpoint as a plain pytree of numpy arrays."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return jax.tree.map(np.asarray, state)


# lr 0.01: at PS-KD's default 0.05 this tiny run (alpha 0.8 on a 50%-accurate model) amplifies
# float32 rounding differences from ~1e-7 to ~1e-4 within 16 steps; at 0.01 they stay ~1e-7.
DEVICE_COMPARISON_LR = 0.01


def device_comparison_config(**overrides):
  """`tiny_config` made well-conditioned for comparing device counts over a whole run (see
  tests/roundoff.py): the MLP (no max-pool near-ties to flip) at lr 0.01."""
  return tiny_config(**{"model.name": "mlp", "optimizer.learning_rate": DEVICE_COMPARISON_LR,
                        **overrides})


def two_step_config(**overrides):
  """LeNet-5-BN for 2 steps (128 images, 1 epoch) on the synthetic dataset (coarse class
  prototypes plus pixel noise, 32x32x3): the trainer's cross-device BatchNorm, compared where
  it is well-conditioned. On Fashion-MNIST's constant backgrounds the second step already
  differs by ~1e-2 between 1 and 4 devices (max-pool and ReLU near-ties); here by ~1e-6."""
  return tiny_config(num_epochs=1, **{"data.name": "synthetic", "data.limit_train": 128,
                                      **overrides})


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  results = loop.train_and_evaluate(
      tiny_config(num_devices=1, **{"optimizer.learning_rate": DEVICE_COMPARISON_LR}), workdir)
  return results, final_state(workdir)


@pytest.mark.cross_device
def test_four_devices_equal_one_device(tmp_path):
  """A whole run (2 epochs, 16 steps, PS-KD tables written and read) on 1 and 4 devices."""
  runs = {}
  for num_devices in (1, 4):
    workdir = str(tmp_path / str(num_devices))
    results = loop.train_and_evaluate(device_comparison_config(num_devices=num_devices), workdir)
    runs[num_devices] = results, final_state(workdir)
  (results_1, state_1), (results_4, state_4) = runs[1], runs[4]
  # Past predictions: 512 rows, padded to a multiple of 4 (no padding needed here).
  assert state_4["method_state"]["past_predictions"]["rows"].shape == (512, 10)
  # Same images, same order, gradients pmean'd: only the summation order of float reductions
  # differs, so the whole state (optimizer traces and tables included) agrees to round-off.
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.RUN_RTOL)
  assert results_4["num_devices"] == 4 and results_1["num_devices"] == 1
  assert abs(results_4["test_top1"] - results_1["test_top1"]) <= 1e-3  # at most 1 of 1000
  assert results_4["state_bytes_per_device"] * 4 == results_1["state_bytes_per_device"]


@pytest.mark.cross_device
def test_batch_norm_model_two_steps_on_four_devices_equal_one_device(tmp_path):
  """LeNet-5-BN for 2 steps: BatchNorm statistics reduced over devices by the trainer."""
  states = {}
  for num_devices in (1, 4):
    workdir = str(tmp_path / str(num_devices))
    loop.train_and_evaluate(two_step_config(num_devices=num_devices), workdir)
    states[num_devices] = final_state(workdir)
  assert int(states[4]["step"]) == 2
  assert {"bn1", "bn2"} <= set(states[4]["batch_stats"])
  roundoff.assert_trees_close_to_scale(states[4], states[1], roundoff.STEP_RTOL)


@pytest.mark.cross_device
def test_pmap_equals_shard_map(tmp_path):
  shard_map_dir, pmap_dir = str(tmp_path / "sm"), str(tmp_path / "pm")
  loop.train_and_evaluate(device_comparison_config(num_devices=2, num_epochs=1), shard_map_dir)
  loop.train_and_evaluate(device_comparison_config(num_devices=2, num_epochs=1, parallel="pmap"),
                          pmap_dir)
  # The same per-device body; XLA may still fuse and order the two programs' sums differently.
  roundoff.assert_trees_close_to_scale(final_state(pmap_dir), final_state(shard_map_dir),
                                       roundoff.RUN_RTOL)


def test_compiled_once_and_results_file(one_device_run, tmp_path):
  results, state = one_device_run
  assert results["train_step_compilations"] == 1  # 16 steps, 2 epochs, 2 evaluations
  assert int(state["step"]) == 2 * (512 // 64)
  for key in ("test_top1", "test_top5", "test_nll", "test_ece", "test_aurc", "best_test_top1",
              "best_epoch", "epochs", "wall_s", "images_per_s", "method", "model", "dataset",
              "seed"):
    assert key in results
  assert results["epochs"] == 2 and results["method"] == "pskd"
  assert 0.0 <= results["test_ece"] <= 1.0 and results["test_top5"] >= results["test_top1"]
  # The stored calibration bins reproduce the reported top-1 and ECE (10000 test images).
  bins = {k: np.asarray(v) for k, v in results["test_calibration_bins"].items()}
  assert bins["count"].shape == (15,) and bins["count"].sum() == 10000
  np.testing.assert_allclose(bins["correct_sum"].sum() / 10000, results["test_top1"])
  np.testing.assert_allclose(
      np.abs(bins["correct_sum"] - bins["confidence_sum"]).sum() / 10000, results["test_ece"])


def test_finished_run_is_not_trained_again(tmp_path):
  config = tiny_config(num_devices=1, num_epochs=1)
  first = loop.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == first
  assert loop.train_and_evaluate(config, str(tmp_path)) == first


def test_epoch_end_eval_refresh_writes_every_row_of_a_bfloat16_table(tmp_path):
  """refresh='epoch_end_eval' with storage_dtype='bfloat16' on 2 devices: every training
  example gets a clean prediction (a probability row, none left at zero), and the checkpoint
  holds the table as bits (uint16) that decode to those rows."""
  config = tiny_config(num_devices=2, num_epochs=1)
  config.method.refresh = "epoch_end_eval"
  config.method.storage_dtype = "bfloat16"
  loop.train_and_evaluate(config, str(tmp_path))
  rows = final_state(str(tmp_path))["method_state"]["past_predictions"]["rows"]
  assert rows.dtype == np.uint16 and rows.shape == (512, 10)
  values = rows.view(jax.numpy.bfloat16).astype(np.float32)
  assert values.min() >= 0.0
  np.testing.assert_allclose(values.sum(-1), 1.0, rtol=1e-2)  # bf16 keeps 8 significant bits


def _signal_in_step_8(monkeypatch):
  """SIGTERM raised inside the 8th train step (the last of epoch 1); the loop's handler turns
  it into a flag, as for a real signal."""
  compile_steps = loop.Experiment.compile

  def compile_with_a_signal(self, abstract_state):
    compile_steps(self, abstract_state)
    train_step, calls = self.train_step, []

    def step(*args):
      calls.append(None)
      if len(calls) == 8:
        signal.raise_signal(signal.SIGTERM)
      return train_step(*args)

    self.train_step = step

  monkeypatch.setattr(loop.Experiment, "compile", compile_with_a_signal)


def _watch_passes(monkeypatch, signal_in=None):
  """`{'train' or 'test': batches the latest pass over that split handed out}`, filled as the
  run goes (the refresh reads the training set, the evaluation the test set). With `signal_in`,
  SIGTERM is raised as the first pass over that split hands out its first batch."""
  sequential, taken = loop.Experiment._sequential, {}

  def watched(self, source):
    split = "train" if source is self.train_source else "test"
    first = split not in taken
    for i, batch in enumerate(sequential(self, source)):
      taken[split] = i + 1
      if first and i == 0 and split == signal_in:
        signal.raise_signal(signal.SIGTERM)
      yield batch

  monkeypatch.setattr(loop.Experiment, "_sequential", watched)
  return taken


def _epoch_end_eval_config():
  return tiny_config(num_devices=1, eval_batch_size=256, **{"method.refresh": "epoch_end_eval"})


@pytest.fixture(scope="module")
def uninterrupted_epoch_end_eval_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("whole")
  loop.train_and_evaluate(_epoch_end_eval_config(), str(workdir))
  return workdir


def _evaluations(workdir):
  """eval_history.json without the wall-clock times ([] before the first evaluation)."""
  path = os.path.join(workdir, "eval_history.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [{k: v for k, v in entry.items() if k != "wall_s"} for entry in json.load(f)]


@pytest.mark.parametrize("when", ["last_step", "evaluation"])
def test_a_stop_at_an_epochs_end_resumes_as_if_uninterrupted(
    tmp_path, monkeypatch, when, uninterrupted_epoch_end_eval_run):
  """SIGTERM during step 8 (the last of epoch 1) or during epoch 1's evaluation. The run stops
  the pass of the epoch's end it is in after one batch (the refresh, PS-KD's eval-mode rewrite
  of every table row, 2 batches; the evaluation, 40), saves step 8 and exits; resumed, it does
  epoch 1's end again and goes on: bitwise the same state and the same evaluations as the
  uninterrupted run. (A boundary checkpoint saved before the refresh used to be resumed
  without it; the passes used to run to their end.)"""
  whole, workdir = str(uninterrupted_epoch_end_eval_run), str(tmp_path)
  with monkeypatch.context() as patch:
    if when == "last_step":
      _signal_in_step_8(patch)
    taken = _watch_passes(patch, signal_in="test" if when == "evaluation" else None)
    with pytest.raises(loop.Preempted, match="saved a checkpoint at step 8"):
      loop.train_and_evaluate(_epoch_end_eval_config(), workdir)
  assert taken == ({"train": 1} if when == "last_step" else {"train": 2, "test": 1})
  assert _evaluations(workdir) == []

  loop.train_and_evaluate(_epoch_end_eval_config(), workdir)
  assert [entry["epoch"] for entry in _evaluations(workdir)] == [1, 2]
  assert _evaluations(workdir) == _evaluations(whole)
  jax.tree.map(np.testing.assert_array_equal, final_state(workdir), final_state(whole))


def test_non_finite_loss_stops_with_the_step(tmp_path):
  config = tiny_config(num_devices=1, num_epochs=1, log_every_steps=1,
                       checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e30
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss .* at step (\d+)") as err:
    loop.train_and_evaluate(config, str(tmp_path))
  bad_step = int(err.value.args[0].split("at step ")[1].split()[0])
  assert bad_step >= 1
  # The checkpoints written before the bad step are kept; no state after it was saved.
  manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
  assert manager.latest_step() == bad_step
  manager.close()
  assert not os.path.exists(tmp_path / "results.json")


@pytest.mark.parametrize("override, message", [
    ({"method.alpha_T": 1.5}, "config.method.alpha_T=1.5 is outside [0, 1]"),
    ({"method.name": "nope"}, "config.method.name='nope' is not allowed"),
    ({"model.name": "vgg"}, "config.model.name='vgg' is not allowed"),
    ({"batch_size": 66, "num_devices": 4}, "config.batch_size=66 must be a positive multiple"),
    ({"model.num_classes": 100}, "config.model.num_classes=100 does not match"),
    ({"eval_batch_size": 90, "num_devices": 4}, "config.eval_batch_size=90 must be 0"),
    ({"data.name": "no_such_dataset"}, "config.data.name='no_such_dataset' is not a known"),
    ({"method.refresh": "often"}, "config.method.refresh='often' is not allowed"),
    ({"method.alpha": 0.1}, "config.method.alpha is not a key of method 'pskd'"),
    ({"data.reader": "dali"}, "config.data.reader='dali' is not allowed"),
    ({"method": method_config("zipf")}, "dense=True needs a model with dense per-position"),
    # Refused by the method's constructor, still before anything is compiled or written.
    ({"method": method_config("tfkd_reg", variant="code")},
     "config.method (tfkd_reg): tfkd_reg: unknown variant 'code'; allowed: faithful, paper"),
])
def test_bad_config_is_one_clear_line(tmp_path, override, message):
  with pytest.raises(ConfigError) as err:
    loop.train_and_evaluate(tiny_config(**override), str(tmp_path))
  assert message in str(err.value)
  assert "\n" not in str(err.value)
  assert not os.path.exists(tmp_path / "checkpoints")  # failed before anything was built


def test_workdir_of_another_config_is_refused(tmp_path):
  loop.train_and_evaluate(tiny_config(num_devices=1, num_epochs=1), str(tmp_path))
  with pytest.raises(ConfigError, match="different config .*alpha_T"):
    loop.train_and_evaluate(tiny_config(num_devices=1, num_epochs=1, **{"method.alpha_T": 0.5}),
                            str(tmp_path))


def _write_artifact(path, dataset, num_classes):
  from selfkd_jax import reffakd
  similarity = np.eye(num_classes) * 0.5 + 0.1
  reffakd.save_artifact(str(path), reffakd.make_artifact(
      similarity, dataset=dataset, samples_per_class=4, seed=0, diag_boost=0.008, ae_epochs=1))


def test_reffakd_trains_from_its_artifact_and_refuses_another_datasets(tmp_path):
  good, other = tmp_path / "fm.json", tmp_path / "digits.json"
  _write_artifact(good, "fashion_mnist", 10)
  _write_artifact(other, "digits", 10)
  reffakd_config = lambda path: tiny_config(
      num_devices=1, num_epochs=1,
      method=method_config("reffakd", variant="kldiv_mean", artifact=str(path)))
  results = loop.train_and_evaluate(reffakd_config(good), str(tmp_path / "run"))
  assert results["method"] == "reffakd" and results["test_top1"] > 0.3
  with pytest.raises(ConfigError) as err:  # an artifact of another dataset: exit 2, one line
    loop.train_and_evaluate(reffakd_config(other), str(tmp_path / "refused"))
  assert "digits" in str(err.value) and "fashion_mnist" in str(err.value)
  assert "\n" not in str(err.value)
  # KD reads the same artifact as a pseudo-teacher.
  kd_config = tiny_config(num_devices=1, num_epochs=1,
                          method=method_config("kd", teacher="reffakd", artifact=str(good)))
  assert loop.train_and_evaluate(kd_config, str(tmp_path / "kd"))["method"] == "kd"
