"""python -m selfkd_jax.sweep: the planned commands, skipping, failures, signals, a real run."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from selfkd_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CE, PSKD = "configs/fashion_mnist/ce.py", "configs/fashion_mnist/pskd.py"

# Stands in for launch.py: seed 0 fails, seed 1 finishes, seed 2 waits for SIGTERM.
FAKE_LAUNCH = r"""
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir, seed = args["workdir"], int(args["config.seed"])
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "argv.json"), "w") as f:
  json.dump(sys.argv[1:], f)
if seed == 0:
  print("error: config.optimizer.learning_rate=-1 must be > 0", file=sys.stderr)
  sys.exit(2)
if seed == 1:
  open(os.path.join(workdir, "results.json"), "w").write("{}")
  sys.exit(0)
def stop(*_):
  open(os.path.join(workdir, "got_sigterm"), "w").close()
  sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(workdir, "started"), "w").close()
time.sleep(20)
"""


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)


def run_sweep(capsys, *args):
  status = sweep.main([str(a) for a in args])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def command(config, workdir, seed, *overrides):
  return shlex.join([sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}",
                     f"--config.seed={seed}", *overrides])


def test_list_prints_every_command_seed_major(in_repo, tmp_path, capsys):
  root = tmp_path / "r"
  status, out, err = run_sweep(capsys, f"--configs={CE},{PSKD}", "--seeds=0,1",
                               f"--root={root}", "--list")
  assert status == 0, err
  assert out.splitlines() == [
      command(CE, f"{root}/ce/seed0", 0), command(PSKD, f"{root}/pskd/seed0", 0),
      command(CE, f"{root}/ce/seed1", 1), command(PSKD, f"{root}/pskd/seed1", 1)]


def test_grid_workdirs_and_overrides(in_repo, tmp_path, capsys):
  root = tmp_path / "r"
  status, out, err = run_sweep(
      capsys, f"--configs={PSKD}:smoke", "--seeds=3", f"--root={root}", "--list",
      "--set", "method.alpha_T=0.5", "--set", "num_epochs=1", "--set", "method.alpha_T=0.8",
      "--set", "data.dir=/data/f+mnist")
  assert status == 0, err
  suffix = "+num_epochs=1+data.dir=%2Fdata%2Ff%2Bmnist"
  assert out.splitlines() == [
      command(f"{PSKD}:smoke", f"{root}/pskd-smoke+method.alpha_T=0.5{suffix}/seed3", 3,
              "--config.method.alpha_T=0.5", "--config.num_epochs=1",
              "--config.data.dir=/data/f+mnist"),
      command(f"{PSKD}:smoke", f"{root}/pskd-smoke+method.alpha_T=0.8{suffix}/seed3", 3,
              "--config.method.alpha_T=0.8", "--config.num_epochs=1",
              "--config.data.dir=/data/f+mnist")]


def _finish(workdir, config_json=None):
  os.makedirs(workdir)
  (workdir / "results.json").write_text(json.dumps({"test_top1": 0.5}))
  if config_json is not None:
    (workdir / "config.json").write_text(config_json)


def test_finished_runs_are_skipped_and_not_listed(in_repo, tmp_path, capsys, monkeypatch):
  root = tmp_path / "r"
  args = [f"--configs={CE}", "--seeds=0,1", f"--root={root}"]
  run = sweep.Run(CE, 0, (), str(root / "ce" / "seed0"))
  _finish(root / "ce" / "seed0", sweep.load_config(run).to_json())  # its own config: fine
  _finish(root / "ce" / "seed1")
  status, out, _ = run_sweep(capsys, *args, "--list")
  assert status == 0 and out == ""

  def no_process(*args, **kwargs):
    raise AssertionError("a finished run was started")
  monkeypatch.setattr(subprocess, "Popen", no_process)
  status, out, _ = run_sweep(capsys, *args)
  assert status == 0
  assert out.count("finished, skipped") == 2
  assert "2 runs: 0 ran, 2 already finished, 0 failed" in out


def test_dry_run_shows_new_resume_and_finished(in_repo, tmp_path, capsys):
  root = tmp_path / "r"
  _finish(root / "ce" / "seed0")
  os.makedirs(root / "ce" / "seed1" / "checkpoints")  # interrupted: launch.py resumes it
  status, out, _ = run_sweep(capsys, f"--configs={CE}", "--seeds=0-2", f"--root={root}",
                             "--dry_run")
  assert status == 0
  assert [line.split()[0] for line in out.splitlines()] == ["finished", "resume", "new"]
  assert out.splitlines()[1].endswith(command(CE, f"{root}/ce/seed1", 1))
  assert not (root / "ce" / "seed2").exists()  # a dry run creates nothing


@pytest.mark.parametrize("content", ["{not json", "[]", '{"test_top1": "fast"}', ""])
def test_results_that_do_not_parse_are_not_finished(in_repo, tmp_path, capsys, content):
  root = tmp_path / "r"
  _finish(root / "ce" / "seed0")
  (root / "ce" / "seed0" / "results.json").write_text(content)
  status, out, _ = run_sweep(capsys, f"--configs={CE}", "--seeds=0", f"--root={root}",
                             "--dry_run")
  assert status == 0
  # launch.py rebuilds unreadable results from the final checkpoint: the sweep resumes it.
  assert [line.split()[0] for line in out.splitlines()] == ["resume"]


def test_finished_run_of_another_config_is_a_failure(in_repo, tmp_path, capsys):
  root = tmp_path / "r"
  run = sweep.Run(CE, 0, (), str(root / "ce" / "seed0"))
  other = json.loads(sweep.load_config(run).to_json())
  other["num_epochs"] = 99
  _finish(root / "ce" / "seed0", json.dumps(other))
  status, _, err = run_sweep(capsys, f"--configs={CE}", "--seeds=0", f"--root={root}")
  assert status == 1
  assert "holds checkpoints of a different config (config.num_epochs" in err
  # The sweep's own way out (launch.py's --workdir advice does not apply), and no 'rerun:'
  # line: launch.py would refuse it the same way.
  assert "sweep into another --root, or move that workdir away" in err
  assert "--workdir" not in err and "rerun:" not in err


def test_keys_a_resume_may_change_do_not_name_workdirs(in_repo, tmp_path, capsys):
  """Adding --set progress_bar=False to a sweep used to start every finished run again."""
  root = tmp_path / "r"
  status, out, err = run_sweep(capsys, f"--configs={CE}", "--seeds=0", f"--root={root}",
                               "--list", "--set", "progress_bar=False", "--set",
                               "num_epochs=1")
  assert status == 0, err
  assert out.splitlines() == [command(CE, f"{root}/ce+num_epochs=1/seed0", 0,
                                      "--config.progress_bar=False", "--config.num_epochs=1")]
  status, _, err = run_sweep(capsys, f"--configs={CE}", "--seeds=0", f"--root={root}", "--list",
                             "--set", "num_devices=1", "--set", "num_devices=2")
  assert status == 2 and "differ only in keys a resume may change" in err, err


@pytest.mark.parametrize("args, message", [
    ([f"--configs={CE},configs/nope.py"], "config file 'configs/nope.py' (from --configs) "
     "does not exist"),
    ([f"--configs={CE}", "--seeds=0,x"], "'x' is not a seed"),
    ([f"--configs={CE}", "--seeds=1,0-2"], "repeats seed 1"),
    ([f"--configs={CE}", "--set", "seed=3"], "give seeds with --seeds"),
    ([f"--configs={CE}", "--set", "num_epochs"], "is not key=value"),
    ([f"--configs={CE}", "--set", "method.alpha_T=0.5"], "has no key 'method.alpha_T'"),
    ([f"--configs={CE}", "--set", "num_epochs=many"], "invalid literal for int()"),
    ([f"--configs={CE}:huge"], "unknown config argument 'huge'"),
    ([f"--configs={CE},{CE}"], "lists a config twice"),
    ([f"--configs={CE}", "--dry_run"], "argument --list: not allowed with argument --dry_run"),
])
def test_bad_input_is_one_line_and_status_2(in_repo, tmp_path, capsys, args, message):
  status, out, err = run_sweep(capsys, *args, f"--root={tmp_path}", "--list")
  assert status == 2 and out == ""
  assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_same_stem_from_two_folders_refused(tmp_path, capsys):
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "ce.py").write_text("")
  status, _, err = run_sweep(capsys, f"--configs={tmp_path}/a/ce.py,{tmp_path}/b/ce.py",
                             f"--root={tmp_path}/r", "--list")
  assert status == 2 and "would share the workdir" in err


def test_failure_does_not_stop_the_sweep_and_sigterm_is_forwarded(in_repo, tmp_path, capsys,
                                                                     monkeypatch):
  fake = tmp_path / "fake_launch.py"
  fake.write_text(FAKE_LAUNCH)
  monkeypatch.setattr(sweep, "LAUNCH", str(fake))
  root = tmp_path / "r"
  args = [f"--configs={CE}", f"--root={root}", "--set", "num_epochs=2"]

  status, out, err = run_sweep(capsys, *args, "--seeds=0,1")
  assert status == 1
  assert "2 runs: 1 ran, 0 already finished, 1 failed" in out
  failed = f"{root}/ce+num_epochs=2/seed0"
  assert (f"failed: {failed}: exit status 2: error: config.optimizer.learning_rate=-1 must be "
          "> 0") in err
  assert json.loads((root / "ce+num_epochs=2" / "seed1" / "argv.json").read_text()) == [
      f"--config={CE}", f"--workdir={root}/ce+num_epochs=2/seed1", "--config.seed=1",
      "--config.num_epochs=2"]

  # SIGTERM to the sweep reaches the running launch.py (so it can checkpoint) and ends the
  # sweep: seed 0 after seed 2 is never started.
  started = root / "ce+num_epochs=2" / "seed2" / "started"

  def terminate_when_started():
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
      time.sleep(0.05)
    if started.exists():  # never signal pytest itself when the run did not start
      os.kill(os.getpid(), signal.SIGTERM)
  thread = threading.Thread(target=terminate_when_started)
  thread.start()
  status, _, err = run_sweep(capsys, *args, "--seeds=2,0")
  thread.join()
  assert status == 143
  assert (root / "ce+num_epochs=2" / "seed2" / "got_sigterm").exists()
  assert "stopped by SIGTERM" in err and "failed:" not in err


def test_real_tiny_sweep_then_report(in_repo, tmp_path, capsys):
  """One real launch.py run through the sweep (seconds), then the report on its root."""
  root, out = tmp_path / "runs", tmp_path / "report"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  flags = [f"--configs={CE}:smoke", "--seeds=0", f"--root={root}", "--set", "num_epochs=1",
           "--set", "data.limit_train=256", "--set", "batch_size=64"]
  done = subprocess.run([sys.executable, "-m", "selfkd_jax.sweep", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-2000:]
  workdir = root / "ce-smoke+num_epochs=1+data.limit_train=256+batch_size=64" / "seed0"
  results = json.loads((workdir / "results.json").read_text())
  assert results["method"] == "ce" and results["seed"] == 0 and results["epochs"] == 1

  # Again (in this process, which is quicker): the finished run is skipped, not started.
  assert sweep.main(flags) == 0
  assert "finished, skipped" in capsys.readouterr().out

  report = subprocess.run([sys.executable, "-m", "selfkd_jax.report", str(root), "--out",
                           str(out), "--benchmark", "benchmarks/results/cpu.json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert report.returncode == 0, report.stderr
  row = (out / "report.csv").read_text().splitlines()[1].split(",")
  assert row[:7] == ["ce", "ce", "lenet5_bn", "fashion_mnist", "", "1", "0"]
  assert float(row[7]) == results["test_top1"]
  assert (out / "curves.png").stat().st_size > 5000
  assert (out / "accuracy_vs_step_time.png").stat().st_size > 5000
