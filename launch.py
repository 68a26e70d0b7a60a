r"""Train and evaluate one config.

    python launch.py                                   # Fashion-MNIST, LeNet-5-BN, PS-KD -> runs/default
    python launch.py --config=configs/fashion_mnist/ce.py --workdir=runs/fmnist_ce
    python launch.py --config=configs/fashion_mnist/pskd.py:smoke --workdir=/tmp/x \
        --config.method.alpha_T=0.5

Running the same command again resumes from the workdir's latest checkpoint (or prints the
finished run's results). One run owns a workdir at a time (a lock the OS releases when the
process dies); a second launch on a busy workdir is refused. Exit status: 0 done, 1 a run or
environment error (data, non-finite loss, an unwritable workdir), 2 a bad configuration or a
busy workdir, 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM after saving a checkpoint.

Several processes (GPU nodes, TPU pod slices, or two on one machine): start the same command
once per process. Under SLURM (`srun`, one task per process) nothing more is needed; on a TPU
pod slice add `--distributed` (JAX finds its peers); elsewhere give process 0's address, the
process count and each process's id, as flags or as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID:

    python launch.py --config=... --workdir=/nfs/runs/x --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0        # and --process_id=1 on the other process

A partial or inconsistent set is refused in one line (exit 2). The workdir must be on a file
system every process sees.
"""

import os
import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Needed before the flags are parsed, to word their errors; imports absl only (no JAX).
from selfkd_jax.train import flag_errors

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "fashion_mnist", "pskd.py")


def _define_config_flag():
  """`--config`. ml_collections loads the default config file right here, at definition,
  applying any --config.key overrides in sys.argv: a bad one is one line (exit 2) here too."""
  try:
    return config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file (`path` or `path:arg`); override keys with "
        "--config.key=value.", lock_config=True)
  except Exception as error:  # pylint: disable=broad-except  (the default config or an override)
    print(f"error: {flag_errors.message(error, sys.argv)}", file=sys.stderr, flush=True)
    sys.exit(2)


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, logs and "
                               "results.json; reusing it resumes the run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "Start JAX's multi-process runtime with "
                                 "JAX's own cluster detection (TPU pod slices); SLURM and an "
                                 "explicit coordinator are detected without it. "
                                 "--nodistributed ignores SLURM's variables.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                   "(else $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (else "
                                      "$JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 "
                                   "(else $JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 10, "Seconds without a heartbeat "
                                  "after which a lost process stops the others.")
_JOIN_TIMEOUT = flags.DEFINE_integer("join_timeout_s", 300, "Seconds a process waits at start-up "
                                     "for every process of the run to join.", lower_bound=1)


def _fail(message: str, status: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _stop_outside_training(signum, frame):
  """SIGTERM/SIGINT while nothing needs saving (start-up, the final evaluation): one line.

  Inside the training loop the trainer takes these signals over and saves a checkpoint first;
  outside it, everything trained is already in a checkpoint, so stopping at once loses nothing.
  """
  del frame
  name = signal.Signals(signum).name
  print(f"error: {name} outside the training loop (start-up or final evaluation): stopped; "
        "everything trained is in the last checkpoint, run the same command to resume",
        file=sys.stderr, flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access  (no cleanup can lose anything)


def _one_line(text: str) -> str:
  """A multi-line error message as one line: ml_collections puts the reason on later lines, or
  a whole traceback whose last line is the reason."""
  lines = [part.strip() for part in str(text).splitlines() if part.strip()]
  if any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def _lost_peer(error, steps, process_index: int, process_count: int) -> None:
  """A collective failed under several processes: another process died or was cut off.

  One line and an immediate exit: a normal exit would first wait in JAX's shutdown barrier for
  the dead process until the heartbeat timeout, then abort with a page of C++ logs. The lost
  process is named when JAX's error says (`Task N`) or when there is only one peer. Gloo's
  error names only an address; with more processes JAX's coordination service names the
  silent ones itself, in the fatal log it ends every process with once the heartbeat expires
  (asking it sooner cannot work: it answers only at that moment, as it terminates the asker).
  """
  reason = _one_line(str(error)).split(" [type.googleapis")[0][:200]
  task = re.search(r"[Tt]ask (\d+)", str(error))
  if task:
    who = f"process {task.group(1)}"
  elif process_count == 2:
    who = f"process {1 - process_index}"
  else:
    who = "another process of the run"
  kept = f"checkpoint {steps[0]} is intact" if steps else "no checkpoint was written yet"
  print(f"error: process {process_index} lost contact with {who} ({reason}); {kept}: "
        "start the same command on every process again to resume", file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


# Help, printed to stdout with exit 0 (absl exits 1 after it, and does not know -h): the value
# says whether the short help (this module's flags) is enough.
HELP_FLAGS = {"-h": True, "-?": True, "--help": True, "--helpshort": True, "--helpfull": False}


def parse_flags(argv):
  """absl flag parsing with bad flags, config files or config overrides reported in one line,
  exit 2."""
  for arg in argv[1:]:
    if arg in HELP_FLAGS:
      app.usage(shorthelp=HELP_FLAGS[arg], writeto_stdout=True, exitcode=0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(_one_line(error), 2)
  except Exception as error:  # pylint: disable=broad-except  (the config file or an override)
    _fail(flag_errors.message(error, argv), 2)


def _start_cluster(cluster_lib) -> None:
  """Resolves and starts the multi-process runtime; one line and exit 2 / 1 on failure."""
  try:
    cluster = cluster_lib.resolve({"coordinator_address": _COORDINATOR.value,
                                   "num_processes": _NUM_PROCESSES.value,
                                   "process_id": _PROCESS_ID.value},
                                  os.environ, _DISTRIBUTED.value)
  except ValueError as error:  # ConfigError
    _fail(str(error), 2)
  where = cluster.coordinator_address or f"the {cluster.kind} coordinator"
  try:
    cluster_lib.initialize(cluster, heartbeat_timeout_s=_HEARTBEAT.value,
                           timeout_s=_JOIN_TIMEOUT.value)
  except cluster_lib.JoinTimeout:
    print(f"error: process {cluster.process_id} waited {_JOIN_TIMEOUT.value} s at {where} for "
          f"the other processes of the {cluster.num_processes}-process run, and not all "
          "joined: start the same command on every process, each with the same process count "
          "and coordinator and its own id (or raise --join_timeout_s)",
          file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access  (the join thread cannot be stopped; nothing to save)
  except Exception as error:  # pylint: disable=broad-except  (any failure to join: one line)
    _fail(f"process {cluster.process_id} could not join the {cluster.num_processes}-process "
          f"run at {where}: {_one_line(f'{type(error).__name__}: {error}')}", 1)


def main(argv):
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _stop_outside_training)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config, --workdir and --config.key=value", 2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top

  from selfkd_jax.data import DataError  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train import cluster as cluster_lib  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train import config_check  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train.config_check import ConfigError  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train.workdir_lock import WorkdirError  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train.checkpoint import (  # pylint: disable=g-import-not-at-top
      CheckpointSaveError, NoUsableCheckpoint)
  from selfkd_jax.train.workdir_files import (CHECKPOINT_DIR,  # pylint: disable=g-import-not-at-top
                                              checkpoint_steps)

  try:
    config = _CONFIG.value
    config.keys()  # ml_collections defers a config file's load error to the first use
  except Exception as error:  # pylint: disable=broad-except  (whatever the config's code raised)
    _fail(flag_errors.message(error.__cause__ or error, sys.argv), 2)
  _start_cluster(cluster_lib)
  try:
    note = config_check.drop_published_unless_recipe(config, flags.FLAGS["config"].config_filename)
    if note and jax.process_index() == 0:
      print(note, flush=True)
    results = loop.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as error:
    _fail(str(error), 2)
  except CheckpointSaveError as error:
    # Orbax's threads are still failing: leave now rather than through interpreter shutdown.
    print(f"error: {error}", file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access  (the earlier checkpoints are complete)
  except (DataError, loop.NonFiniteLossError, WorkdirError, NoUsableCheckpoint) as error:
    _fail(str(error), 1)
  except loop.Preempted as error:
    _fail(str(error), error.exit_status)
  except jax.errors.JaxRuntimeError as error:
    if jax.process_count() == 1:
      raise
    _lost_peer(error, checkpoint_steps(os.path.join(_WORKDIR.value, CHECKPOINT_DIR)),
               jax.process_index(), jax.process_count())
  if jax.process_index() == 0:
    print(f"{results['method']} / {results['model']} / {results['dataset']}: "
          f"test top1 {results['test_top1']:.4f}  top5 {results['test_top5']:.4f}  "
          f"nll {results['test_nll']:.4f}  ece {results['test_ece']:.4f}  "
          f"aurc {results['test_aurc']:.4f}  (best top1 {results['best_test_top1']:.4f} at epoch "
          f"{results['best_epoch']}; {results['wall_s']:.0f} s)")
    print(f"results: {os.path.join(_WORKDIR.value, 'results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
