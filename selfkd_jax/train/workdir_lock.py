"""One run per workdir: an exclusive lock held for the whole run.

The lock is `flock` on `<workdir>/.lock`: the kernel releases it when the holding process exits
in any way (SIGKILL included), so a crash never leaves a stale lock, and a second launch on a
busy workdir is refused at once instead of training the same job twice or mixing two configs'
files. The file records who holds it (host, pid, start time) for the refusal message; its
content is informational only, the lock is the `flock`.

Multi-host runs: process 0 takes the lock for the run (the workdir is shared), and every process
learns the outcome, so all of them stop together when it is refused. `flock` works on local
file systems and on NFSv4 (as a POSIX lock); on a file system without locks the run says so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np

from selfkd_jax.train.config_check import ConfigError
from selfkd_jax.train.workdir_files import LOCK_FILE, WorkdirError


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; one-line errors for a bad path or an unwritable place.

  Raises:
    ConfigError: an empty `--workdir`, or one that names an existing file.
    WorkdirError: the directory cannot be created or written (permissions, read-only mount).
  """
  if not workdir:
    raise ConfigError("--workdir is empty; give a directory for checkpoints and results")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory; use another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} is not writable (permissions or a read-only "
                       "mount); use another --workdir")
  return workdir


class WorkdirLock:
  """The held lock of one workdir; `release()` (or process exit) gives it up."""

  def __init__(self, workdir: str, fd: int | None):
    self.workdir = workdir
    self._fd = fd

  @classmethod
  def acquire(cls, workdir: str) -> "WorkdirLock":
    """Takes the lock of `workdir` for this run, or raises ConfigError naming the holder."""
    busy_message = None
    fd = None
    if jax.process_index() == 0:
      fd, busy_message = _try_lock(workdir)
    if jax.process_count() > 1:
      # Every process must stop if process 0 was refused; a collective, so all take part.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      busy = multihost_utils.broadcast_one_to_all(np.int32(busy_message is not None))
      if int(busy) and busy_message is None:
        busy_message = f"workdir {workdir} is in use by another run (seen by process 0)"
    if busy_message is not None:
      raise ConfigError(busy_message)
    return cls(workdir, fd)

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _try_lock(workdir: str) -> tuple[int | None, str | None]:
  """`(fd, None)` with the lock held, or `(None, message)` when another process holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    # Root passes os.access everywhere; a read-only mount or /proc shows up only here.
    raise WorkdirError(f"--workdir {workdir} is not writable: cannot create {path} "
                       f"({e.strerror or e}); use another --workdir") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(fd)
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return None, (f"workdir {workdir} is in use by another run ({holder}); wait for it to "
                    "finish or use another --workdir")
    raise WorkdirError(f"cannot lock {path} ({e.strerror or e}); the file system may not "
                       "support locks: use a workdir on one that does") from None
  os.ftruncate(fd, 0)
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  return fd, None


def _read_holder(fd: int) -> str:
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {record['pid']} on {record['host']}, started {record['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"
