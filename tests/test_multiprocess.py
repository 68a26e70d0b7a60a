"""Several processes for real: launch.py started once per process on 127.0.0.1 through JAX's
multi-controller runtime (CPU collectives over Gloo), as a user starts them on a cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import roundoff
from selfkd_jax.train import checkpoint as checkpoint_lib
from selfkd_jax.train import cluster
from selfkd_jax.train.config_check import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 epochs of 16 steps, a checkpoint every 4 steps (and a stop check with it).
FLAGS = ["--config=configs/fashion_mnist/pskd.py:smoke", "--config.num_epochs=4",
         "--config.checkpoint_every_steps=4", "--config.log_every_steps=4",
         "--config.progress_bar=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", **extra)
  return env


def start_processes(workdir, num_processes, devices_per_process, *flags):
  """`num_processes` launch.py processes of one run, the documented way (JAX_* variables)."""
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "launch.py", f"--workdir={workdir}", *FLAGS, *flags], cwd=REPO,
      env=_env(devices_per_process, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(num_processes)]


def finish(processes, timeout=300):
  outputs = [p.communicate(timeout=timeout) for p in processes]
  return [p.returncode for p in processes], outputs


def one_process(workdir, devices, *flags):
  return subprocess.run([sys.executable, "launch.py", f"--workdir={workdir}", *FLAGS, *flags],
                        cwd=REPO, env=_env(devices), capture_output=True, text=True,
                        timeout=300)


def final_leaves(workdir):
  """The newest checkpoint's leaves, restored onto one device whatever wrote them."""
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  path = os.path.join(workdir, "checkpoints", str(steps[-1]), "default")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
  state = checkpointer.restore(path, abstract)
  return steps[-1], [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_run(workdir_a, workdir_b):
  step_a, leaves_a = final_leaves(workdir_a)
  step_b, leaves_b = final_leaves(workdir_b)
  assert step_a == step_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)  # 2 devices: a sum of two is exact in any order
  results = [json.load(open(os.path.join(w, "results.json"))) for w in (workdir_a, workdir_b)]
  assert results[0]["test_top1"] == results[1]["test_top1"]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
  """`runs(d)`: the workdir of an uninterrupted 1-process run on d devices (made once)."""
  made = {}

  def runs(devices, *flags):
    if (devices, flags) not in made:
      workdir = str(tmp_path_factory.mktemp(f"one_{devices}") / "run")
      result = one_process(workdir, devices, *flags)
      assert result.returncode == 0, result.stderr
      made[devices, flags] = workdir
    return made[devices, flags]

  return runs


@pytest.fixture(scope="module")
def one_process_two_devices(one_process_runs):
  return one_process_runs(2)


# 4 devices: the cross-process all-reduce sums 4 values in another order than the in-process
# one, and LeNet on Fashion-MNIST amplifies that round-off to 1e-2 over a run; compared instead
# on the well-conditioned MLP at lr 0.01, to float32 round-off (tests/roundoff.py).
MLP_FLAGS = ("--config.model.name=mlp", "--config.optimizer.learning_rate=0.01")


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, one_process_runs):
  """2 x 2 against 1 x 4. (2 x 1 against 1 x 2, bitwise, is what the stop and kill tests below
  end with.)"""
  workdir = str(tmp_path / "two")
  codes, outputs = finish(start_processes(workdir, 2, 2, *MLP_FLAGS))
  assert codes == [0, 0], [err[-2000:] for _, err in outputs]
  step_a, leaves_a = final_leaves(workdir)
  step_b, leaves_b = final_leaves(one_process_runs(4, *MLP_FLAGS))
  assert step_a == step_b
  roundoff.assert_trees_close_to_scale(leaves_a, leaves_b, roundoff.RUN_RTOL)
  # Only process 0 speaks: its epoch lines and result; process 1 prints none of ours.
  assert "epoch 4/4" in outputs[0][0] and "test top1" in outputs[0][0]
  ours = [line for line in outputs[1][0].splitlines() if not line.startswith("[Gloo]")]
  assert ours == [], outputs[1][0]
  # Each process wrote its own checkpoint shards.
  step_dir = os.path.join(workdir, "checkpoints", "64", "default")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir))

  # Each process hashes its share of a checkpoint's files (checkpoint.step_checksums): a byte
  # flipped in a file only process 1 reads must still make both skip the step. The rerun resumes
  # from step 60 and replaces step 64 with the same bits.
  files = checkpoint_lib.step_files(os.path.dirname(step_dir))
  victim = max(files[1::2], key=lambda name: os.path.getsize(
      os.path.join(os.path.dirname(step_dir), name)))
  with open(os.path.join(os.path.dirname(step_dir), victim), "r+b") as f:
    f.seek(os.path.getsize(f.name) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  os.remove(os.path.join(workdir, "results.json"))
  codes, outputs = finish(start_processes(workdir, 2, 2, *MLP_FLAGS))
  assert codes == [0, 0], [err[-2000:] for _, err in outputs]
  assert (f"Skipping checkpoint 64: {victim} does not match its checksum" in outputs[0][0]
          and "Resuming from step 60" in outputs[0][0]), outputs[0][0]
  step_c, leaves_c = final_leaves(workdir)
  assert step_c == step_a
  for a, c in zip(leaves_a, leaves_c):
    np.testing.assert_array_equal(a, c)


def test_sigterm_to_one_process_stops_both_at_the_same_step_then_resumes_exactly(
    tmp_path, one_process_two_devices):
  """Stopped as 2 processes x 1 device, resumed as 1 process x 2 devices (another process
  count; the same device count, hence the same arithmetic and the same bits)."""
  workdir = str(tmp_path / "two")
  processes = start_processes(workdir, 2, 1)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.02)
  processes[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
  codes, outputs = finish(processes)
  assert codes == [143, 143], [err[-2000:] for _, err in outputs]
  saved = [line for line in outputs[0][1].splitlines() if "saved a checkpoint at step" in line]
  assert len(saved) == 1, outputs[0][1]
  assert saved[0] in outputs[1][1]  # the same step on both
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  result = one_process(workdir, 2)
  assert result.returncode == 0, result.stderr
  assert "Resuming from step" in result.stdout
  assert_same_run(workdir, one_process_two_devices)


def test_a_killed_process_stops_the_other_at_once_and_a_rerun_resumes_exactly(
    tmp_path, one_process_two_devices):
  """Process 1 is killed (process 0 also hosts JAX's coordination service; losing it ends the
  others through JAX's own fatal error, which no Python code can intercept)."""
  killed = 1
  workdir = str(tmp_path / "two")
  # Checkpoints at epoch ends only, and the kill right after the first is recorded: the
  # survivor is then training (a collective every step), not inside a save, whose barriers
  # learn of the loss only from JAX's heartbeat (10 s) and may end in JAX's own abort.
  processes = start_processes(workdir, 2, 1, "--config.checkpoint_every_steps=16")
  record = os.path.join(workdir, "checkpoint_checksums", "16.json")
  deadline = time.time() + 240
  while not os.path.exists(record):
    assert time.time() < deadline and all(p.poll() is None for p in processes)
    time.sleep(0.02)
  processes[killed].kill()
  killed_at = time.time()
  survivor = processes[1 - killed]
  _, stderr = survivor.communicate(timeout=120)
  # Its next collective fails and it leaves at once: well before the 10 s heartbeat.
  assert time.time() - killed_at < 8, stderr[-3000:]
  processes[killed].communicate()
  assert survivor.returncode == 1, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: process {1 - killed} lost contact with process {killed} "), stderr[-3000:]
  assert "start the same command on every process again to resume" in lines[0]

  codes, outputs = finish(start_processes(workdir, 2, 1, "--config.checkpoint_every_steps=16"))
  assert codes == [0, 0], [err[-2000:] for _, err in outputs]
  assert_same_run(workdir, one_process_two_devices)


BAD_LAUNCHES = [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"},
     "JAX_COORDINATOR_ADDRESS given but not --num_processes or JAX_NUM_PROCESSES and "
     "--process_id or JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "given but not --coordinator_address or JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='127.0.0.1' must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' must be an integer >= 1"),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7"},
     "SLURM_NTASKS=4 but SLURM_STEP_NODELIST, SLURM_LOCALID are not set"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "3", "SLURM_JOB_ID": "7",
      "SLURM_STEP_NODELIST": "n1", "SLURM_LOCALID": "0"},
     "SLURM_PROCID=3 must be below SLURM_NTASKS=2"),
]


@pytest.mark.parametrize("environ, message", BAD_LAUNCHES)
def test_a_partial_or_inconsistent_launch_is_refused(environ, message):
  with pytest.raises(ConfigError) as error:
    cluster.resolve({}, environ)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_resolved_launches():
  explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
              "JAX_PROCESS_ID": "3"}
  assert cluster.resolve({}, explicit) == cluster.Cluster("explicit", "10.0.0.1:1234", 4, 3)
  # Flags win over the environment.
  assert cluster.resolve({"process_id": 1}, explicit).process_id == 1
  slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_LOCALID": "0"}
  assert cluster.resolve({}, slurm) == cluster.Cluster("slurm", None, 2, 1)
  assert cluster.resolve({}, slurm, distributed=False).kind == "single"
  assert cluster.resolve({}, {"SLURM_NTASKS": "1"}).kind == "single"
  assert cluster.resolve({}, {}, distributed=True).kind == "auto"
  assert not cluster.resolve({}, {}).distributed


def test_a_bad_launch_environment_is_one_line_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "launch.py", f"--workdir={workdir}", *FLAGS],
                          cwd=REPO, env=_env(1, JAX_COORDINATOR_ADDRESS="127.0.0.1:1234"),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      "error: JAX_COORDINATOR_ADDRESS given but not --num_processes or JAX_NUM_PROCESSES and "
      "--process_id or JAX_PROCESS_ID: a multi-process launch needs the coordinator address, "
      "the process count and this process's id"], result.stderr
  assert not workdir.exists()


def _alone(workdir, port, *flags):
  """Process 0 of a 2-process run whose process 1 never comes."""
  return subprocess.Popen(
      [sys.executable, "launch.py", f"--workdir={workdir}", *FLAGS, *flags], cwd=REPO,
      env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_join_that_never_completes_times_out_in_one_line_and_a_signal_stops_it(tmp_path):
  """A process waiting for peers that never come used to sit in JAX's join deaf to SIGTERM and
  Ctrl-C, then die after 5 minutes of a fatal C++ log and a core dump. Now: one line, exit 1
  after --join_timeout_s; and a SIGTERM while waiting stops it at once (exit 143)."""
  waiting_port, timing_port = _free_port(), _free_port()
  timing_out = _alone(tmp_path / "a", timing_port, "--join_timeout_s=3")
  waiting = _alone(tmp_path / "b", waiting_port, "--join_timeout_s=600")
  try:
    _check_join_timeout_and_signal(tmp_path, waiting, waiting_port, timing_out, timing_port)
  finally:  # a failure must not leave a process waiting for its peer
    for process in (timing_out, waiting):
      if process.poll() is None:
        process.kill()
        process.communicate()


def _check_join_timeout_and_signal(tmp_path, waiting, waiting_port, timing_out, timing_port):
  deadline = time.time() + 120
  while True:  # the coordinator listens once process 0 is inside the join
    assert waiting.poll() is None and time.time() < deadline, waiting.stderr.read()
    with socket.socket() as probe:
      if probe.connect_ex(("127.0.0.1", waiting_port)) == 0:
        break
    time.sleep(0.1)
  waiting.send_signal(signal.SIGTERM)
  _, stderr = waiting.communicate(timeout=30)
  assert waiting.returncode == 143, stderr
  assert stderr.strip().splitlines()[-1].startswith("error: SIGTERM outside the training loop")

  _, stderr = timing_out.communicate(timeout=120)
  assert timing_out.returncode == 1, stderr
  assert stderr.strip().splitlines() == [
      f"error: process 0 waited 3 s at 127.0.0.1:{timing_port} for the other processes of the "
      "2-process run, and not all joined: start the same command on every process, each with "
      "the same process count and coordinator and its own id (or raise --join_timeout_s)"]
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_busy_workdir_refuses_every_process_of_a_multi_process_run(tmp_path):
  """The lock is the run's: process 0 takes it and tells the others, so all stop together."""
  import fcntl  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / ".lock", "w") as holder:
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the workdir
    codes, outputs = finish(start_processes(str(workdir), 2, 1), timeout=120)
  assert codes == [2, 2], [err[-2000:] for _, err in outputs]
  for (_, stderr), who in zip(outputs, ("", " (seen by process 0)")):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"workdir {workdir} is in use by another run" in lines[0], stderr
    assert who in lines[0], stderr
  assert sorted(os.listdir(workdir)) == [".lock"]  # nothing written
