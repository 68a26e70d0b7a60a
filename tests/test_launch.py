"""launch.py as a user runs it, in real subprocesses: kill/resume, SIGTERM, bad configuration."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 6 epochs of 16 steps on 2048 images, a checkpoint every 5 steps: long enough to be killed
# mid-run after the first checkpoint appears.
RUN_FLAGS = ["--config=configs/fashion_mnist/pskd.py:smoke", "--config.num_epochs=6",
             "--config.checkpoint_every_steps=5", "--config.progress_bar=False",
             "--config.num_devices=2"]
# RAS-KD carries prototypes, class flags, and an auxiliary head with its own optimizer state.
RAS_KD_FLAGS = ["--config=configs/fashion_mnist/ras_kd.py:smoke", *RUN_FLAGS[1:]]


def _env():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return env


def launch(workdir, *flags, timeout=300):
  return subprocess.run([sys.executable, "launch.py", f"--workdir={workdir}", *flags], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def start(workdir, *flags):
  return subprocess.Popen([sys.executable, "launch.py", f"--workdir={workdir}", *flags],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def wait_for_checkpoint(workdir, process, timeout=240):
  """Polls until a finished checkpoint directory (a plain step number) exists."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
      return
    if process.poll() is not None:
      raise AssertionError(f"run ended before its first checkpoint: {process.stderr.read()}")
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


def checkpoint_leaves(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("run_flags", [RUN_FLAGS, RAS_KD_FLAGS], ids=["pskd", "ras_kd"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, run_flags):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert launch(straight, *run_flags).returncode == 0

  process = start(killed, *run_flags)
  wait_for_checkpoint(killed, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  process.stdout.close()
  process.stderr.close()
  assert not os.path.exists(os.path.join(killed, "results.json")), "the run was not interrupted"

  resumed = launch(killed, *run_flags)
  assert resumed.returncode == 0, resumed.stderr
  assert "Resuming from step" in resumed.stdout

  step_a, leaves_a = checkpoint_leaves(straight)
  step_b, leaves_b = checkpoint_leaves(killed)
  assert step_a == step_b == 6 * 16
  assert len(leaves_a) == len(leaves_b)
  # params, BN stats, optimizer, RNG and the method state (past predictions; prototypes, head)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(straight, "results.json")) as f:
    results_a = json.load(f)
  with open(os.path.join(killed, "results.json")) as f:
    results_b = json.load(f)
  for key in ("test_top1", "test_nll", "test_ece", "test_aurc", "best_test_top1", "best_epoch"):
    assert results_a[key] == results_b[key], key


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
  workdir = str(tmp_path)
  process = start(workdir, *RUN_FLAGS)
  wait_for_checkpoint(workdir, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr
  saved = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.latest_step() == saved
  manager.close()


@pytest.mark.parametrize("flags, message", [
    (["--config.method.alpha_T=1.5"], "config.method.alpha_T=1.5 is outside [0, 1]"),
    (["--config.method.name=nope"], "config.method.name='nope' is not allowed"),
    (["--config.method.no_such_key=1"], "no_such_key"),
    (["--config.num_devices=2", "--config.batch_size=127"],
     "config.batch_size=127 must be a positive multiple of the device count (2)"),
])
def test_bad_configuration_exits_2_with_one_line(tmp_path, flags, message):
  result = launch(str(tmp_path), "--config=configs/fashion_mnist/pskd.py:smoke", *flags,
                  timeout=120)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_teacher_overrides_go_through_the_student_config(tmp_path):
  # --config.teacher.config.* reaches the nested teacher config (here: refused before training).
  result = launch(str(tmp_path), "--config=configs/fashion_mnist/kd.py:smoke",
                  "--config.teacher.config.num_epochs=0", timeout=120)
  assert result.returncode == 2, result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error_lines == ["error: config.teacher.config.num_epochs=0 must be > 0"], result.stderr
  assert not os.path.exists(tmp_path / "teacher")
