"""launch.py as a user runs it, in real subprocesses: kill/resume, SIGTERM and SIGINT, the workdir
lock, bad configuration."""

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
# RAS-KD carries prototypes and class flags, and its auxiliary head is a head of the model.
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


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """An uninterrupted RUN_FLAGS run; tests copy it, never change it."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  result = launch(workdir, *RUN_FLAGS)
  assert result.returncode == 0, result.stderr
  return workdir


def checkpoint_leaves(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("run_flags", [RUN_FLAGS, RAS_KD_FLAGS], ids=["pskd", "ras_kd"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, run_flags, request):
  killed = str(tmp_path / "killed")
  if run_flags is RUN_FLAGS:  # the module's uninterrupted run (read only)
    straight = request.getfixturevalue("straight_run")
  else:
    straight = str(tmp_path / "straight")
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


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["sigterm", "sigint"])
def test_stop_signal_saves_a_checkpoint_and_exits_128_plus_signal(tmp_path, signum, status):
  workdir = str(tmp_path)
  process = start(workdir, *RUN_FLAGS)
  wait_for_checkpoint(workdir, process)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == status, stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  saved = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.latest_step() == saved
  manager.close()


def test_signal_before_training_is_one_line(tmp_path):
  workdir = str(tmp_path)
  process = start(workdir, *RUN_FLAGS)
  lock = os.path.join(workdir, ".lock")
  deadline = time.time() + 120
  while not (os.path.exists(lock) and os.path.getsize(lock)) and time.time() < deadline:
    time.sleep(0.01)  # the lock is taken after the config and data checks, before compiling
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr
  assert "Traceback" not in stderr
  assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1, stderr


def test_a_busy_workdir_is_refused_and_the_owner_finishes_intact(tmp_path):
  workdir = str(tmp_path)
  owner = start(workdir, *RUN_FLAGS)
  wait_for_checkpoint(workdir, owner)
  # Another config on the same workdir while the owner trains: refused, nothing touched.
  intruder = launch(workdir, *RUN_FLAGS, "--config.seed=1", timeout=120)
  assert intruder.returncode == 2, intruder.stderr
  error_lines = [line for line in intruder.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "is in use by another run" in error_lines[0]
  assert f"pid {owner.pid}" in error_lines[0], error_lines
  _, stderr = owner.communicate(timeout=300)
  assert owner.returncode == 0, stderr
  for name in ("config.json", "results.json"):
    with open(os.path.join(workdir, name)) as f:
      assert json.load(f)["seed"] == 0, name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert len(steps) == len(set(steps)), "a second writer logged the same steps"


def test_teacher_overrides_go_through_the_student_config(tmp_path):
  # --config.teacher.config.* reaches the nested teacher config (here: refused before training).
  result = launch(str(tmp_path), "--config=configs/fashion_mnist/kd.py:smoke",
                  "--config.teacher.config.num_epochs=0", timeout=120)
  assert result.returncode == 2, result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error_lines == ["error: config.teacher.config.num_epochs=0 must be an integer > 0"], \
      result.stderr
  assert not os.path.exists(tmp_path / "teacher")


@pytest.mark.parametrize("kind", ["a file", "empty"])
def test_a_workdir_that_cannot_be_one_is_one_line(tmp_path, kind):
  path = tmp_path / "taken"
  path.write_text("not a directory\n")
  workdir = str(path) if kind == "a file" else ""
  result = launch(workdir, "--config=configs/fashion_mnist/pskd.py:smoke", timeout=120)
  assert result.returncode == 2, result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "--workdir" in error_lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert path.read_text() == "not a directory\n"


def test_an_existing_directory_that_cannot_be_written_is_one_line():
  # /proc exists on every Linux and refuses new files even to root (for whom os.access says
  # yes): the case of a read-only mount.
  result = launch("/proc", "--config=configs/fashion_mnist/pskd.py:smoke", timeout=120)
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "error: --workdir /proc is not writable: cannot create /proc/.lock ("), result.stderr


def test_a_flipped_byte_in_the_last_checkpoint_falls_back_and_ends_the_same(tmp_path,
                                                                           straight_run):
  import shutil
  straight, damaged = straight_run, str(tmp_path / "damaged")
  shutil.copytree(straight, damaged)
  os.remove(os.path.join(damaged, "results.json"))
  last = os.path.join(damaged, "checkpoints", str(6 * 16))
  data = [os.path.join(root, name) for root, _, names in os.walk(last) for name in names
          if f"{os.sep}d{os.sep}" in os.path.join(root, name)]
  target = max(data, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))

  resumed = launch(damaged, *RUN_FLAGS)
  assert resumed.returncode == 0, resumed.stderr
  assert f"Skipping checkpoint {6 * 16}: " in resumed.stdout, resumed.stdout
  assert f"Resuming from step {6 * 16 - 1}" in resumed.stdout  # the previous kept step
  step_a, leaves_a = checkpoint_leaves(straight)
  step_b, leaves_b = checkpoint_leaves(damaged)
  assert step_a == step_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


SMOKE = "--config=configs/fashion_mnist/pskd.py:smoke"
CIFAR = "--config=configs/cifar100/pskd_preact_resnet18.py"


KD = "--config=configs/fashion_mnist/kd.py:smoke"
# Every configuration check, launched as a user would: (flags, the error line's text, id).
# "{tiny}" is a Fashion-MNIST-format folder of 4x4 images written by the test.
BAD_INPUTS = [
    (["--config=no_such_config.py"], "--config=no_such_config.py: no such file", "missing file"),
    (["--config=configs"], "--config=configs: IsADirectoryError", "directory"),
    (["--config={raises}"], "--config={raises}: ZeroDivisionError: division by zero", "raises"),
    (["--config={no_get_config}"], "--config={no_get_config}: the file defines no get_config()",
     "no get_config"),
    ([f"{SMOKE[:-6]}:nonsense"], "unknown config argument 'nonsense'; allowed: smoke", "bad arg"),
    ([SMOKE, "--no_such_flag"], "Unknown command line flag 'no_such_flag'", "unknown flag"),
    ([SMOKE, "--config.no_such_key=1"], "--config.no_such_key=1: config has no key "
     "'no_such_key'; its keys: batch_size, checkpoint_every_steps, data,", "unknown key"),
    ([SMOKE, "--config.optimizer.learning_rat=0.1"], "--config.optimizer.learning_rat=0.1: "
     "config.optimizer has no key 'learning_rat' (did you mean 'learning_rate'?); its keys: ",
     "misspelled key"),
    (["--config.method.alpha=0.5"], "--config.method.alpha=0.5: config.method has no key "
     "'alpha' (did you mean 'alpha_T'?); its keys: alpha_T, name, refresh, storage_dtype",
     "default config, other key"),
    ([SMOKE, "--config.data.name.x=1"], "config.data.name is a value ('fashion_mnist'), not a "
     "group of keys", "key under a value"),
    ([SMOKE, "--config.eval_every_epochs=0"], "config.eval_every_epochs=0 must be an integer",
     "eval_every 0"),
    ([SMOKE, "--config.seed=-1"], "config.seed=-1 must be an integer >= 0", "seed -1"),
    ([SMOKE, "--config.num_epochs=0"], "config.num_epochs=0 must be an integer > 0", "epochs 0"),
    ([CIFAR, "--config.optimizer.milestones=abc"], "config.optimizer.milestones=('abc',)",
     "milestones abc"),
    ([SMOKE, "--config.optimizer.milestones=(3,)"],
     "config.optimizer.milestones=(3,) has no effect with config.optimizer.schedule='cosine'",
     "milestones with cosine"),
    ([SMOKE, "--config.num_epochs=1000000000000"], "the step counter is int32", "int32 steps"),
    ([SMOKE, "--config.data.limit_train=100000"],
     "config.data.limit_train=100000 exceeds the 60000 training examples", "limit_train"),
    ([SMOKE, "--config.data.limit_train=-1"], "config.data.limit_train=-1 must be >= 0",
     "limit_train -1"),
    ([SMOKE, "--config.data.crop_padding=100"], "config.data.crop_padding=100 must be -1",
     "crop_padding"),
    ([SMOKE, "--config.data.dir={tiny}", "--config.data.limit_train=0"],
     "config.model.name='lenet5_bn' cannot take the 4x4x1 images of 'fashion_mnist'",
     "4x4 images"),
    ([SMOKE, "--config.data.name=no_such_dataset"],
     "config.data.name='no_such_dataset' is not a known dataset", "dataset"),
    ([SMOKE, "--config.data.reader=magic"], "config.data.reader='magic' is not allowed",
     "reader"),
    ([SMOKE, "--config.model.name=resnet1000"], "config.model.name='resnet1000' is not allowed",
     "model"),
    ([SMOKE, "--config.model.dtype=float8"], "config.model.dtype='float8' is not allowed",
     "dtype"),
    ([SMOKE, "--config.model.num_classes=7"],
     "config.model.num_classes=7 does not match dataset 'fashion_mnist'", "num_classes"),
    ([SMOKE, "--config.parallel=threads"], "config.parallel='threads' is not allowed",
     "parallel"),
    ([SMOKE, "--config.num_devices=3"],
     "config.num_devices=3 must be 0 (every visible device) or 1..2", "devices"),
    ([SMOKE, "--config.batch_size=4096"],
     "config.batch_size=4096 is larger than the training set (2048 examples)", "batch > N"),
    ([SMOKE, "--config.eval_batch_size=3"], "config.eval_batch_size=3 must be 0", "eval batch"),
    ([SMOKE, "--config.optimizer.name=lbfgs"], "config.optimizer.name='lbfgs' is not allowed",
     "optimizer"),
    ([SMOKE, "--config.optimizer.schedule=linear"],
     "config.optimizer.schedule='linear' is not allowed", "schedule"),
    ([SMOKE, "--config.method.alpha_T=1.5"], "config.method.alpha_T=1.5 is outside [0, 1]",
     "alpha_T 1.5"),
    ([SMOKE, "--config.optimizer.learning_rate=nan"],
     "config.optimizer.learning_rate=nan must be > 0", "lr nan"),
    ([SMOKE, "--config.keep_checkpoints=0"], "config.keep_checkpoints=0 must be >= 1",
     "keep 0"),
    ([SMOKE, "--config.method.name=nope"], "config.method.name='nope' is not allowed",
     "method"),
    ([SMOKE, "--config.method.no_such_key=1"], "no_such_key", "method key"),
    ([SMOKE, "--config.batch_size=127"],
     "config.batch_size=127 must be a positive multiple of the device count (2)", "batch 127"),
    ([SMOKE, "--config.method.refresh=never"], "config.method.refresh='never' is not allowed",
     "refresh"),
    ([SMOKE, "--config.method.storage_dtype=int8"],
     "config.method.storage_dtype='int8' is not allowed", "storage dtype"),
    ([KD, "--config.method.temperature=0"], "config.method.temperature=0.0 must be > 0",
     "temperature 0"),
    ([KD, "--config.method.alpha=2"], "config.method.alpha=2.0 is outside [0, 1]", "alpha 2"),
    ([KD, "--config.teacher.config.model.name=nope"],
     "config.teacher.config.model.name='nope' is not allowed", "teacher model"),
]


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
  """A Fashion-MNIST-format folder whose images are 4x4: too small for LeNet's pooling."""
  from test_data_idx import _write_dataset  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("tiny4")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (256, 4, 4), dtype=np.uint8)
  labels = (np.arange(256) % 10).astype(np.uint8)
  _write_dataset(folder, images, labels, images[:64], labels[:64])
  return str(folder)


@pytest.mark.parametrize("flags, message", [entry[:2] for entry in BAD_INPUTS],
                         ids=[entry[2] for entry in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(tmp_path, tiny_images,
                                                                     flags, message):
  workdir = tmp_path / "run"
  (tmp_path / "raises.py").write_text("def get_config():\n  return 1 / 0\n")
  (tmp_path / "no_get_config.py").write_text("CONFIG = {}\n")
  def fill(text):
    return (text.replace("{tiny}", tiny_images).replace("{raises}", str(tmp_path / "raises.py"))
            .replace("{no_get_config}", str(tmp_path / "no_get_config.py")))

  flags, message = [fill(flag) for flag in flags], fill(message)
  result = launch(str(workdir), *flags, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_is_printed_to_stdout_with_exit_0(flag):
  """absl exited 1 after --help (the status of a data error) and refused -h."""
  result = subprocess.run([sys.executable, "launch.py", flag], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "--workdir" in result.stdout and "--join_timeout_s" in result.stdout
  assert ("logtostderr" in result.stdout) == (flag == "--helpfull")  # absl's own flags


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(:\n")
  result = launch(str(tmp_path / "run"), f"--config={path}", timeout=120)
  assert result.returncode == 2, result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert error_lines == [
      f"error: --config={path}: SyntaxError: invalid syntax (broken.py, line 1)"], \
      result.stderr


def test_garbage_results_are_rewritten_and_garbage_history_is_one_line(tmp_path, straight_run):
  import shutil
  finished, resumable = str(tmp_path / "finished"), str(tmp_path / "resumable")
  shutil.copytree(straight_run, finished)
  with open(os.path.join(finished, "results.json")) as f:
    results = json.load(f)
  shutil.copytree(finished, resumable)

  # results.json is derived: an unreadable one is rebuilt from the final checkpoint.
  with open(os.path.join(finished, "results.json"), "w") as f:
    f.write("{not json")
  rerun = launch(finished, *RUN_FLAGS)
  assert rerun.returncode == 0, rerun.stderr
  assert "results.json is unreadable" in rerun.stdout
  with open(os.path.join(finished, "results.json")) as f:
    rebuilt = json.load(f)
  for key in ("test_top1", "test_nll", "best_test_top1", "best_epoch"):
    assert rebuilt[key] == results[key], key

  # eval_history.json is not: the epochs' test metrics are only there. One line, nothing lost.
  os.remove(os.path.join(resumable, "results.json"))
  history = os.path.join(resumable, "eval_history.json")
  with open(history, "w") as f:
    f.write("[{]")
  refused = launch(resumable, *RUN_FLAGS)
  assert refused.returncode == 1, refused.stderr
  error_lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and "eval_history.json is unreadable" in error_lines[0]
  assert "Traceback" not in refused.stderr
  with open(history) as f:
    assert f.read() == "[{]"


def test_a_failed_save_is_one_line_and_the_rerun_ends_as_if_nothing_happened(tmp_path,
                                                                           straight_run):
  """A full disk, simulated by a file-size limit (the same write error from TensorStore, EFBIG
  instead of ENOSPC): the first save fails, the run stops with one line, nothing is trusted
  from the half-written step, and the same command later finishes exactly like a clean run."""
  workdir = str(tmp_path / "run")
  # The limit is set in the child before it execs launch.py (a preexec_fn would run Python in
  # a fork of this multithreaded test process). Python ignores SIGXFSZ, so a write past the
  # limit fails with EFBIG.
  limited = ("import os, resource, sys; "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
  full = subprocess.run([sys.executable, "-c", limited, "launch.py", f"--workdir={workdir}",
                         *RUN_FLAGS], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert full.returncode == 1, full.stderr
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  assert full.stderr.strip().splitlines() == [
      f"error: cannot save checkpoint 5 in {workdir}/checkpoints (File too large [errno 27]); "
      "no earlier checkpoint exists: free space (or fix the file system) and run the same "
      "command to resume"], full.stderr[-3000:]
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]

  rerun = launch(workdir, *RUN_FLAGS)
  assert rerun.returncode == 0, rerun.stderr
  step_a, leaves_a = checkpoint_leaves(straight_run)
  step_b, leaves_b = checkpoint_leaves(workdir)
  assert step_a == step_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


def test_a_run_resumes_on_another_device_count(tmp_path):
  """2047 examples: 2048 table rows on 2 devices, 2047 on 1. Stopped on 2, finished on 1; the
  run goes on from the saved step (the device count changes results only by round-off)."""
  workdir = str(tmp_path / "run")
  flags = [*RUN_FLAGS, "--config.data.limit_train=2047"]
  process = start(workdir, *flags)
  wait_for_checkpoint(workdir, process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr
  stopped_at = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])

  resumed = launch(workdir, *flags[:-2], "--config.num_devices=1", flags[-1])
  assert resumed.returncode == 0, resumed.stderr
  assert f"Resuming from step {stopped_at}" in resumed.stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["num_devices"] == 1 and results["epochs"] == 6
  assert results["test_top1"] > 0.5  # trained on, not restarted from a broken state
