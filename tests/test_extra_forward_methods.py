"""Methods with extra forwards or heads in the trainer (MrKD snapshots, CS-KD partners, BYOT
exits, LSSKD rotation heads): resume equals uninterrupted, 1 device equals 4."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from selfkd_jax.train import loop

import roundoff
from test_train import DEVICE_COMPARISON_LR, device_comparison_config, final_state, tiny_config


def config_for(method, base=tiny_config, **overrides):
  from selfkd_jax.train.default_config import method_config
  config = base(**{"optimizer.learning_rate": DEVICE_COMPARISON_LR, **overrides})
  # MrKD: a snapshot every 4 steps, 2 kept, so the 16 steps push 3 times and wrap the buffer.
  config.method = (method_config("mrkd_tc", refresh_every=4, num_snapshots=2, tc="mix")
                   if method == "mrkd_tc" else method_config(method))
  return config


@pytest.mark.parametrize("method", ["mrkd_tc", "cskd", "byot", "lsskd"])
def test_resume_equals_uninterrupted(method, tmp_path):
  whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
  results = loop.train_and_evaluate(config_for(method, num_devices=1), whole)
  reference = final_state(whole)
  if method in ("byot", "lsskd"):  # exits are a head: the backbone keeps LeNet-5-BN's count
    params = reference["params"]
    assert set(params) == {"backbone", "heads_0"}
    assert sum(x.size for x in jax.tree.leaves(params["backbone"])) == 61_728
    assert jax.tree.leaves(params["heads_0"]) and not jax.tree.leaves(reference["method_state"]
                                                                       if method == "byot" else ())
  if method == "byot":
    assert set(results["test_exit_top1"]) == {"exit1", "ensemble"}
    assert all(0.0 <= v <= 1.0 for v in results["test_exit_top1"].values())
  if method == "lsskd":  # a head on each LeNet block; tables: main [N, C], per head [4N, 4C]
    assert set(results["test_exit_top1"]) == {"exit1", "exit2", "ensemble"}
    assert results["state_bytes_per_device"] == (512 * 10 + 2 * 4 * 512 * 40) * 4
  if method == "mrkd_tc":  # 3 pushes into 2 slots: the ring buffer wrapped
    assert int(reference["method_state"]["num_filled"]) == 2
    assert int(reference["method_state"]["next_slot"]) == 1

  # Interrupted after epoch 1: drop the last checkpoint and the results, run again. The same
  # machine computes the same thing in the same order: bitwise equal.
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "16"))
  os.remove(os.path.join(resumed, "results.json"))
  loop.train_and_evaluate(config_for(method, num_devices=1), resumed)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(final_state(resumed))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.cross_device
@pytest.mark.parametrize("method", ["mrkd_tc", "cskd"])
def test_whole_run_on_four_devices_equals_one(method, tmp_path):
  """16 steps on the MLP (no max-pool near-ties; see tests/roundoff.py): snapshots and
  partners, 1 vs 4 devices, the whole state.

  Not BYOT and LSSKD: their exits normalise the MLP's 1×1 "stage maps" over the batch, and
  over 16 steps that amplifies round-off past RUN_RTOL at most seeds, on Fashion-MNIST and on
  the synthetic set alike, even at lr 0.001 (measured: the attention BatchNorm's running
  statistics 2-37× RUN_RTOL, the first hidden layer's momentum up to 4×), with or without the
  attention gate. Their collectives are compared where the computation is well-conditioned:
  two trainer steps of LeNet-5-BN below, each method's 4-device step in test_byot.py and
  test_lsskd.py, and LSSKD's user-style shard_map loop in test_own_loop_data_parallel.py."""
  states = {}
  for num_devices in (1, 4):
    workdir = str(tmp_path / str(num_devices))
    loop.train_and_evaluate(config_for(method, device_comparison_config,
                                       num_devices=num_devices), workdir)
    states[num_devices] = final_state(workdir)
  roundoff.assert_trees_close_to_scale(states[4], states[1], roundoff.RUN_RTOL)
  with open(os.path.join(tmp_path, "4", "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  key = {"mrkd_tc": "mrkd_active", "cskd": "cskd_distill"}[method]
  assert any(key in line and line[key] > 0 for line in lines), key


def _one_step(method_name, num_devices):
  import optax
  from selfkd_jax import models
  from selfkd_jax.train import default_config, method_factory, parallel
  from selfkd_jax.train.state import initial_state_fn
  from selfkd_jax.train.step import Augmentation, make_train_step
  runner = parallel.make_runner("shard_map", jax.devices()[:num_devices])
  backbone = models.get_model("lenet5_bn", num_classes=10, bn_axis_name=parallel.AXIS)
  eval_backbone = backbone.clone(bn_axis_name=None)
  tx = optax.sgd(0.1, momentum=0.9)
  context = method_factory.MethodContext(
      num_examples=512, num_classes=10, num_epochs=1, steps_per_epoch=1,
      **method_factory.model_fields(eval_backbone, (28, 28, 1)))
  setup = method_factory.setup_method(default_config.method_config(method_name), context,
                                      backbone, eval_backbone, bn_axis_name=parallel.AXIS)
  method = setup.method
  state = runner.init_state(initial_state_fn(model=setup.eval_model, method=method, tx=tx,
                                             image_shape=(28, 28, 1), seed=0,
                                             num_devices=num_devices))
  # steps_per_epoch = 1: the second step is epoch 1, where MrKD's snapshot exists and LSSKD
  # reads its tables.
  body = make_train_step(model=setup.model, tx=tx, method=method, steps_per_epoch=1,
                         model_inputs=setup.model_inputs,
                         augmentation=Augmentation(2, True, (0.5,), (0.25,)),
                         schedule=lambda s: 0.1, axis_name=parallel.AXIS)
  step = runner.compile_train(body, state)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (64,)).astype(np.int32)
  batch = {"image": rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), "label": labels,
           "index": np.arange(64, dtype=np.int32),
           "partner_image": rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
           "partner_label": labels, "partner_index": np.arange(64, 128, dtype=np.int32)}
  for _ in range(2):
    state, metrics = step(state, runner.put_batch(batch), {})
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.cross_device
@pytest.mark.parametrize("method", ["mrkd_tc", "cskd", "byot", "lsskd"])
def test_two_steps_of_lenet_on_1_and_4_devices(method):
  """LeNet-5-BN (cross-device BatchNorm in model, snapshot, partner and exits) on random-pixel
  images, two steps: before max-pool near-ties can amplify round-off."""
  (state_1, metrics_1), (state_4, metrics_4) = _one_step(method, 1), _one_step(method, 4)
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.STEP_RTOL)
  roundoff.assert_close_to_scale(metrics_4["loss"], metrics_1["loss"], roundoff.STEP_RTOL)


def test_eval_step_reports_each_exit_and_the_logit_mean_ensemble():
  import flax.linen as nn
  import jax.numpy as jnp
  from selfkd_jax.train.state import TrainState
  from selfkd_jax.train.step import EXIT_PREFIX, Augmentation, make_eval_step

  class Fixed(nn.Module):  # logits = the first 3 pixels of the image, and two fixed "exits"
    @nn.compact
    def __call__(self, x, *, train):
      del train
      logits = x.reshape(x.shape[0], -1)[:, :3]
      return {"logits": logits, "exit_class_logits": {"flipped": -logits,
                                                      "shifted": logits[:, ::-1] * 3.0}}

  step = make_eval_step(model=Fixed(), augmentation=Augmentation(0, False, (0.0,), (1.0,)))
  logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 0.0, 4.0]], np.float32)
  images = np.zeros((3, 2, 2, 1), np.uint8)
  images.reshape(3, -1)[:, :3] = logits
  labels = np.array([0, 0, 2], np.int32)
  state = TrainState(step=0, params={}, batch_stats={}, opt_state=(), method_state=(), rng=None)
  stats = jax.device_get(step(state, {"image": images, "label": labels}))
  all_logits = [logits, -logits, logits[:, ::-1] * 3.0]
  expected = {"flipped": np.argmax(-logits, -1) == labels,
              "shifted": np.argmax(logits[:, ::-1], -1) == labels,
              "ensemble": np.argmax(np.mean(all_logits, 0), -1) == labels}
  for name, correct in expected.items():
    np.testing.assert_array_equal(stats[EXIT_PREFIX + name], correct, err_msg=name)
  np.testing.assert_array_equal(stats["correct"], np.argmax(logits, -1) == labels)
