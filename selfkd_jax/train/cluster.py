"""Which multi-process launch this is, from flags and the environment, checked before JAX starts.

`jax.distributed.initialize()` called bare reads only the coordinator address from the
environment and fails with a traceback (`Number of processes must be defined.`) when the rest is
missing; under SLURM it silently skips its detection when one variable is absent. Here every
launch is resolved up front into a `Cluster`, and a partial or inconsistent one is a
`ConfigError` naming what is missing (exit 2), before anything starts:

- **explicit:** a coordinator address, a process count and this process's id, each from its
  flag (`--coordinator_address`, `--num_processes`, `--process_id`) or else its environment
  variable (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). All three, or
  none.
- **slurm:** `SLURM_NTASKS` > 1 (one task per process, `srun`): JAX reads the job's variables;
  every one it needs must be there.
- **auto:** `--distributed`, for platforms JAX detects itself (TPU pod slices).
- **single:** none of these: one process, no coordinator.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Mapping

from selfkd_jax.train.config_check import ConfigError

EXPLICIT = (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
            ("num_processes", "JAX_NUM_PROCESSES"),
            ("process_id", "JAX_PROCESS_ID"))
# What jax's SLURM detection reads; without any one of them it does not detect SLURM at all.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Cluster:
  kind: str                             # 'single', 'explicit', 'slurm' or 'auto'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def distributed(self) -> bool:
    return self.kind != "single"


def _integer(value: str, name: str, minimum: int) -> int:
  try:
    number = int(value)
  except ValueError:
    number = None
  if number is None or number < minimum:
    raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
  return number


def _address(value: str, name: str) -> str:
  host, _, port = value.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"{name}={value!r} must be host:port (e.g. 10.0.0.1:1234), the address "
                      "of process 0")
  return value


def resolve(flags: Mapping[str, object], environ: Mapping[str, str],
            distributed: bool | None = None) -> Cluster:
  """The launch described by `flags` (the three explicit names; None = not given), `environ`
  and `--distributed`. Raises ConfigError for a partial or inconsistent one."""
  given = {}
  for key, variable in EXPLICIT:
    if flags.get(key) is not None:
      given[key] = (str(flags[key]), f"--{key}")
    elif environ.get(variable, "") != "":
      given[key] = (environ[variable], variable)
  if given:
    missing = [f"--{key} or {variable}" for key, variable in EXPLICIT if key not in given]
    if missing:
      named = ", ".join(source for _, source in given.values())
      raise ConfigError(f"{named} given but not {' and '.join(missing)}: a multi-process "
                        "launch needs the coordinator address, the process count and this "
                        "process's id")
    address = _address(*given["coordinator_address"])
    count = _integer(*given["num_processes"], minimum=1)
    process = _integer(*given["process_id"], minimum=0)
    if process >= count:
      raise ConfigError(f"{given['process_id'][1]}={process} must be below "
                        f"{given['num_processes'][1]}={count} (ids are 0..{count - 1})")
    return Cluster("explicit", address, count, process)
  if environ.get("SLURM_NTASKS", "") not in ("", "1") and distributed is not False:
    count = _integer(environ["SLURM_NTASKS"], "SLURM_NTASKS", minimum=1)
    missing = [v for v in SLURM_VARIABLES if environ.get(v, "") == ""]
    if missing:
      raise ConfigError(f"SLURM_NTASKS={count} but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set: start each task with "
                        "srun inside the allocation (or pass --nodistributed for one process)")
    process = _integer(environ["SLURM_PROCID"], "SLURM_PROCID", minimum=0)
    if process >= count:
      raise ConfigError(f"SLURM_PROCID={process} must be below SLURM_NTASKS={count}")
    return Cluster("slurm", None, count, process)
  if distributed:
    return Cluster("auto")
  return Cluster("single")


class JoinTimeout(RuntimeError):
  """Not every process of the run joined within the timeout (environment: exit 1)."""


# JAX's own deadline comes this much after ours: when it expires first it ends the process with
# a fatal C++ log and a core dump, not an exception.
_JAX_DEADLINE_MARGIN_S = 60
_POLL_S = 0.2


def initialize(cluster: Cluster, *, heartbeat_timeout_s: int, timeout_s: int = 300) -> None:
  """Starts JAX's multi-controller runtime for `cluster` (nothing for 'single').

  The join (`jax.distributed.initialize`, which blocks until every process has connected)
  runs on a helper thread while this one waits in short slices, for two reasons: Python runs
  signal handlers only in the main thread and only between bytecodes, so a SIGTERM or Ctrl-C
  sent while the main thread sat inside the join did nothing until it ended; and a join that
  never completes (a process not started, or started with another count) ends here after
  `timeout_s` with `JoinTimeout`, instead of in JAX's fatal abort.
  """
  if not cluster.distributed:
    return
  import jax  # pylint: disable=g-import-not-at-top
  failure = []

  def join():
    try:
      jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                                 num_processes=cluster.num_processes,
                                 process_id=cluster.process_id,
                                 initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S,
                                 heartbeat_timeout_seconds=heartbeat_timeout_s)
    except BaseException as error:  # pylint: disable=broad-except  (re-raised by the caller)
      failure.append(error)

  thread = threading.Thread(target=join, daemon=True, name="selfkd-join")
  thread.start()
  deadline = time.monotonic() + timeout_s
  while thread.is_alive():
    thread.join(_POLL_S)  # returns to the interpreter often: signal handlers run in between
    if thread.is_alive() and time.monotonic() > deadline:
      raise JoinTimeout(f"not every process joined within {timeout_s} s")
  if failure:
    raise failure[0]
