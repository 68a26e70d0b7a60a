"""Frozen checkpoint teachers in the trainer: trained first when missing, pinned by checksum,
run in eval mode on the student's batch, equal on 1 and 4 devices, refused when changed."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import roundoff
from selfkd_jax import losses, models
from selfkd_jax.data.augment import augment_batch
from selfkd_jax.methods import kd, network_teacher
from selfkd_jax.train import loop, teacher as teacher_lib
from selfkd_jax.train.config_check import ConfigError
from selfkd_jax.train.default_config import method_config, teacher_config
from selfkd_jax.train.state import initial_state_fn
from selfkd_jax.train.step import Augmentation, make_train_step

from test_train import device_comparison_config, final_state


def tiny(method_name, **method_values):
  """test_train's tiny run (512 images, batch 64), one epoch of the MLP at lr 0.01 (well
  conditioned for comparing device counts, see tests/roundoff.py), with this method."""
  config = device_comparison_config(num_epochs=1)
  config.method = method_config(method_name, **method_values)
  return config


def student_config(teacher_dir, method="kd", **overrides):
  config = tiny(method, **({"teacher": "checkpoint"} if method != "tfkd_self" else {}))
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", workdir=str(teacher_dir))
  config.teacher.config = tiny("ce")
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
  root = tmp_path_factory.mktemp("kd")
  teacher_dir, student_dir = root / "teacher", root / "student"
  results = loop.train_and_evaluate(student_config(teacher_dir, num_devices=1), str(student_dir))
  return teacher_dir, student_dir, results


def test_missing_teacher_is_trained_first_and_pinned_by_checksum(teacher_and_student):
  teacher_dir, student_dir, results = teacher_and_student
  with open(teacher_dir / "results.json") as f:
    assert json.load(f)["method"] == "ce"
  assert results["method"] == "kd"
  with open(student_dir / "teacher.json") as f:
    record = json.load(f)
  variables, step = teacher_lib.load_variables(str(teacher_dir))
  assert record["workdir"] == os.path.abspath(teacher_dir) and record["step"] == step == 8
  assert record["sha256"] == teacher_lib.variables_sha256(variables)
  # The student's checkpoint references the teacher; it does not copy its parameters.
  student_state = final_state(str(student_dir))
  assert set(student_state) == {"step", "params", "batch_stats", "opt_state", "method_state",
                                "rng"}


@pytest.mark.cross_device
def test_teacher_student_runs_agree_on_1_and_4_devices_and_pmap(teacher_and_student, tmp_path):
  teacher_dir, student_dir, _ = teacher_and_student
  reference = final_state(str(student_dir))
  for name, overrides in (("four", {"num_devices": 4}),
                          ("pmap", {"num_devices": 2, "parallel": "pmap"})):
    loop.train_and_evaluate(student_config(teacher_dir, **overrides), str(tmp_path / name))
    roundoff.assert_trees_close_to_scale(final_state(str(tmp_path / name)), reference,
                                         roundoff.RUN_RTOL)


def test_resume_refuses_a_changed_teacher(teacher_and_student, tmp_path):
  teacher_dir, student_dir, _ = teacher_and_student
  config = student_config(teacher_dir)
  # A student that started from this teacher (its teacher.json), then the teacher is retrained.
  shutil.copy(student_dir / "teacher.json", tmp_path / "teacher.json")
  changed = tmp_path / "changed_teacher"
  original = config.teacher.config
  config.teacher.config = _with_seed(original, 7)
  loop.train_and_evaluate(config.teacher.config, str(changed))
  config.teacher.workdir = str(changed)
  with pytest.raises(ConfigError, match="changed since this run started"):
    teacher_lib.prepare_teacher(config, str(tmp_path), num_classes=10, resuming=True,
                                train=loop.train_and_evaluate)
  # Unchanged: accepted.
  config.teacher.workdir, config.teacher.config = str(teacher_dir), original
  teacher = teacher_lib.prepare_teacher(config, str(tmp_path), num_classes=10, resuming=True,
                                        train=loop.train_and_evaluate)
  assert teacher.step == 8


def test_a_finished_teacher_run_of_another_config_is_refused(teacher_and_student, tmp_path):
  """A teacher override (more epochs, another model) used to be dropped silently when the
  teacher workdir already held a finished run, while the student's config.json recorded it."""
  teacher_dir, _, _ = teacher_and_student
  config = student_config(teacher_dir)
  config.teacher.config.num_epochs = 2
  with pytest.raises(ConfigError, match=(
      rf"the finished teacher run in {teacher_dir} was trained with another config than "
      r"config.teacher.config \(config.teacher.config.num_epochs: saved 1, now 2\)")):
    teacher_lib.prepare_teacher(config, str(tmp_path / "s"), num_classes=10, resuming=False,
                                train=loop.train_and_evaluate)
  assert not (tmp_path / "s").exists()
  config = student_config(teacher_dir)
  config.teacher.config.model.name = "lenet5_bn"
  with pytest.raises(ConfigError, match=r"config.teacher.config.model.name: saved 'mlp', now "
                                        r"'lenet5_bn'"):
    teacher_lib.prepare_teacher(config, str(tmp_path / "s"), num_classes=10, resuming=False,
                                train=loop.train_and_evaluate)


def _with_seed(config, seed):
  config = config.copy_and_resolve_references()
  config.seed = seed
  return config


def test_teacher_errors_are_config_errors(tmp_path):
  config = student_config(tmp_path / "t")
  del config["teacher"]
  with pytest.raises(ConfigError, match="no config.teacher"):
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  config = student_config(tmp_path / "t")
  config.teacher.config.data.name = "digits"
  with pytest.raises(ConfigError, match="a teacher must share the student's dataset"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  config = student_config(tmp_path / "t")
  config.teacher.config.num_epochs = 0
  with pytest.raises(ConfigError, match="config.teacher.config.num_epochs=0"):
    loop.train_and_evaluate(config, str(tmp_path / "c"))
  # A resuming student whose teacher run has gone is refused, not silently retrained.
  config = student_config(tmp_path / "gone")
  with pytest.raises(ConfigError, match="unfinished or gone"):
    teacher_lib.prepare_teacher(config, str(tmp_path / "d"), num_classes=10, resuming=True,
                                train=loop.train_and_evaluate)


def test_step_runs_the_teacher_in_eval_mode_on_the_students_augmented_batch():
  model = models.get_model("lenet5_bn", num_classes=10)
  teacher_model = models.get_model("lenet5_bn", num_classes=10)
  dummy = jnp.zeros((1, 28, 28, 1))
  teacher_variables = teacher_model.init(jax.random.PRNGKey(5), dummy, train=False)
  # Non-trivial running statistics, so eval mode (running stats) differs from train mode.
  teacher_variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 if "batch_stats" in jax.tree_util.keystr(p) else x, teacher_variables)
  tx = optax.sgd(0.0)
  method = kd(network_teacher(), alpha=1.0, temperature=2.0)
  augmentation = Augmentation(crop_padding=2, flip=True, mean=(0.5,), std=(0.25,))
  state = initial_state_fn(model=model, method=method, tx=tx, image_shape=(28, 28, 1), seed=0,
                           num_devices=1)()
  step = make_train_step(model=model, tx=tx, method=method, steps_per_epoch=4,
                         augmentation=augmentation, schedule=lambda s: 0.0, axis_name=None,
                         teacher_model=teacher_model)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, (8,)).astype(np.int32),
           "index": np.arange(8, dtype=np.int32)}
  _, metrics = jax.jit(step)(state, batch, teacher_variables)

  images = augment_batch(batch["image"], batch["index"], key=state.rng, epoch=0,
                         crop_padding=2, flip=True, mean=(0.5,), std=(0.25,))
  student = model.apply(state.variables(), images, train=True, mutable=["batch_stats"])[0]
  teacher_eval = teacher_model.apply(teacher_variables, images, train=False)["logits"]
  expected = losses.distillation_kl(student["logits"], teacher_eval, 2.0).mean()
  np.testing.assert_allclose(metrics["kd_distill"], expected, rtol=1e-5)
  teacher_train = teacher_model.apply(teacher_variables, images, train=True,
                                      mutable=["batch_stats"])[0]["logits"]
  wrong = losses.distillation_kl(student["logits"], teacher_train, 2.0).mean()
  assert abs(float(wrong) - float(expected)) > 1e-3  # the test can tell the modes apart


def test_best_epoch_teacher_distils_the_variables_of_its_best_test_epoch(tmp_path, monkeypatch):
  """Tf-KD's self-teacher is its best test epoch (`best.pth.tar`), not its last: a teacher run
  with `keep_best_checkpoint` keeps that epoch's variables and a student asks for them."""
  # Test accuracy per epoch, forced so that the best is epoch 2 of 3 (not the last), with a tie
  # at epoch 3 that must not displace it (the first best epoch counts, as results.json says).
  forced_top1 = iter([0.5, 0.7, 0.7])
  real_evaluate = loop.Experiment.evaluate
  monkeypatch.setattr(loop.Experiment, "evaluate",
                      lambda self, state, **kw: {**real_evaluate(self, state, **kw),
                                                 "top1": next(forced_top1)})
  teacher_dir = tmp_path / "teacher"
  config = student_config(teacher_dir, num_devices=1)
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", workdir=str(teacher_dir),
                                  checkpoint="best")
  config.teacher.config = tiny("ce")
  config.teacher.config.update({"num_epochs": 3, "keep_checkpoints": 3,
                                "keep_best_checkpoint": True})
  teacher_results = loop.train_and_evaluate(config.teacher.config, str(teacher_dir))
  assert teacher_results["best_epoch"] == 2 and teacher_results["epochs"] == 3
  best_variables, best_step = teacher_lib.load_variables(str(teacher_dir), "best")
  assert best_step == 16
  assert os.listdir(teacher_dir / "best_checkpoint") == ["16"]
  last = ocp_restore_step(teacher_dir, 24)
  assert not np.array_equal(jax.tree.leaves(last["params"])[0],
                            jax.tree.leaves(best_variables["params"])[0])
  regular = ocp_restore_step(teacher_dir, 16)
  for a, b in zip(jax.tree.leaves(best_variables),
                  jax.tree.leaves({"params": regular["params"],
                                   "batch_stats": regular["batch_stats"]})):
    np.testing.assert_array_equal(a, b)

  monkeypatch.setattr(loop.Experiment, "evaluate", real_evaluate)
  loop.train_and_evaluate(config, str(tmp_path / "student"))
  with open(tmp_path / "student" / "teacher.json") as f:
    record = json.load(f)
  assert record["checkpoint"] == "best" and record["step"] == 16
  assert record["sha256"] == teacher_lib.variables_sha256(best_variables)


def ocp_restore_step(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "default"))


def test_best_teacher_needs_a_run_that_keeps_its_best_epoch(tmp_path):
  config = student_config(tmp_path / "t")
  config.teacher.checkpoint = "best"
  with pytest.raises(ConfigError, match="needs config.teacher.config.keep_best_checkpoint=True"):
    loop.train_and_evaluate(config, str(tmp_path / "a"))
  config.teacher.checkpoint = "first"
  with pytest.raises(ConfigError, match="config.teacher.checkpoint='first'.*allowed: last, best"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  # A finished teacher run that did not keep it: one line saying how to get one.
  loop.train_and_evaluate(tiny("ce"), str(tmp_path / "plain"))
  with pytest.raises(ConfigError, match="trained without config.keep_best_checkpoint"):
    teacher_lib.load_variables(str(tmp_path / "plain"), "best")


def test_workdirs_written_before_best_checkpoints_existed_still_resume():
  from selfkd_jax.train import config_check  # pylint: disable=g-import-not-at-top
  student = student_config("t")
  new = json.loads(student.to_json())
  old = json.loads(student.to_json())
  del old["keep_best_checkpoint"], old["teacher"]["checkpoint"]
  del old["teacher"]["config"]["keep_best_checkpoint"]
  assert config_check.comparable(old) == config_check.comparable(new)
  # The keys still decide when they are not at the value the old runs had.
  new["teacher"]["checkpoint"] = "best"
  new["teacher"]["config"]["keep_best_checkpoint"] = True
  changed = config_check.comparable(new)
  assert changed["teacher"]["checkpoint"] == "best"
  assert changed["teacher"]["config"]["keep_best_checkpoint"] is True
