"""Verified Orbax checkpoints of the whole train state under `<workdir>/checkpoints`.

The saved pytree is the global-layout `TrainState`: parameters, BatchNorm statistics, optimizer
state, method state (past predictions included, saved shard by shard), the step (which fixes the
data position) and the RNG. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.

What Orbax does not catch, this adds:

- **A checksum of what was written.** After a save completes, process 0 records the SHA-256 of
  every file of the step (path, size, digest) in `<workdir>/checkpoint_checksums/<step>.json`,
  written atomically. A checkpoint without that record (a run killed between the two) or whose
  files no longer match it (a flipped byte, a truncated or deleted file) is not trusted. One
  exception: a step Orbax finished whose record is missing (the run was killed between the
  save and the record, a window of milliseconds) is restored if Orbax can restore it, said so,
  and recorded then; otherwise a kill at that moment would cost the only checkpoint.
- **Fallback.** `restore` tries the steps newest first and takes the first that verifies and
  restores, reporting every step it skipped and why; a damaged latest checkpoint costs the
  steps since the one before it, never the run.
- **Deletion after verification.** Older steps are deleted only once a newer one is verified,
  keeping the `keep` newest verified steps (at least one).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from selfkd_jax.train.run_log import write_json_atomic
from selfkd_jax.train.workdir_files import (CHECKPOINT_DIR, CHECKSUM_DIR, WorkdirError,
                                            checkpoint_steps)

_CHUNK = 1 << 22


class NoUsableCheckpoint(RuntimeError):
  """Checkpoints exist but none verifies and restores; the message lists why each failed."""


class CheckpointSaveError(WorkdirError):
  """A save failed (a full disk, a quota, an I/O error); the older checkpoints are untouched."""


def step_files(step_dir: str) -> list[str]:
  """The relative paths of every file under `step_dir`, sorted (the same list on every host)."""
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) for name in names)


def step_checksums(step_dir: str, share: tuple[int, int] = (0, 1)) -> dict[str, list]:
  """`{relative path: [size, sha256]}` of the files under `step_dir`.

  `share=(i, n)`: only every n-th file of `step_files`, from the i-th: process i of n hashes its
  share, so that n processes read a checkpoint once between them, not n times.
  """
  index, count = share
  files = {}
  for name in step_files(step_dir)[index::count]:
    path = os.path.join(step_dir, name)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
    files[name] = [os.path.getsize(path), digest.hexdigest()]
  return files


def _share() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def _allgather_json(value) -> list:
  """`value` (JSON-able) of every process, in process order; a collective of all processes."""
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
  padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes.ravel())]


def error_summary(error: Exception, limit: int = 300) -> str:
  """The reason for `error` in one line: the OS error when TensorStore names one (its messages
  run to hundreds of characters of paths), else the first line of the message, cut short."""
  text = str(error)
  os_error = re.search(r"os_error_code='?(\d+)", text)
  if os_error:
    return f"{os.strerror(int(os_error.group(1)))} [errno {os_error.group(1)}]"
  lines = text.strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


@contextlib.contextmanager
def _background_failures_reported_once():
  """Silences Orbax's worker threads while a save runs, and after it if it fails.

  A failed write (a full disk) makes each of Orbax's writer threads log its own traceback, and
  asyncio and `threading` add more as their loops shut down: a hundred lines for one cause. The
  same failure reaches the caller as the save's exception, which `save` turns into one line, so
  the threads' copies are dropped. A save that succeeds restores everything on return. One that
  fails leaves the silence in place, because the threads go on failing for a while after the
  exception (seen in CI, interleaved with the error line): the process is expected to stop.
  """
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels = [logger.level for logger in loggers]
  hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  # TensorStore's callbacks into closed loops print through sys.excepthook; coroutines that
  # never ran to the end, through sys.unraisablehook.
  threading.excepthook = sys.excepthook = sys.unraisablehook = lambda *args: None
  yield  # an exception here leaves the silence on (see above)
  threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
  for logger, level in zip(loggers, levels):
    logger.setLevel(level)


def _return_freed_memory() -> None:
  """Hands the host memory a save freed back to the OS (glibc's `malloc_trim`).

  A save copies the state to host buffers and frees them; glibc keeps freed heap pages for
  reuse, and over save cycles the process's footprint grows (measured at 1.28M x 1000 bf16
  rows: 10.6 -> 14.9 GB peak over three saves; with the trim it stays flat). No-op where the
  C library has no `malloc_trim` (macOS, musl).
  """
  try:
    libc = ctypes.CDLL(None)
    trim = libc.malloc_trim
  except (OSError, AttributeError):
    return
  trim(0)


class Checkpointer:
  """Save/restore of the train state, synchronous so a save is complete when `save` returns."""

  def __init__(self, workdir: str, keep: int = 2, log: Callable[[str], Any] = print, *,
               directory: str = CHECKPOINT_DIR, checksum_directory: str = CHECKSUM_DIR):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.keep = keep
    self.log = log
    self.directory = os.path.abspath(os.path.join(workdir, directory))
    self.checksum_directory = os.path.abspath(os.path.join(workdir, checksum_directory))
    # max_to_keep=None: Orbax would delete old steps before the new one is verified.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Steps this process recorded or verified: deleting old steps after a save then needs no
    # second read of the kept ones (a multi-GB read per save at ImageNet scale).
    self._verified: set[int] = set()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _record_path(self, step: int) -> str:
    return os.path.join(self.checksum_directory, f"{step}.json")

  def steps(self) -> list[int]:
    """Every step directory on disk (finished by Orbax or not verified yet), newest first."""
    return checkpoint_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest step on disk (it may still fail verification at restore)."""
    steps = self.steps()
    return steps[0] if steps else None

  def verify(self, step: int, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when `step`'s files match their recorded checksums, else why not (one line).

    `share`: hash only this share of the files (`step_checksums`); sizes and missing files are
    checked for all. `verify_together` combines the shares of every process.
    """
    path = self._record_path(step)
    if not os.path.exists(path):
      return "no checksum record (the run stopped before recording one)"
    try:
      with open(path) as f:
        recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"unreadable checksum record {path} ({e})"
    step_dir = self._step_dir(step)
    present = set(step_files(step_dir))
    missing = sorted(set(recorded) - present)
    if missing:
      return f"missing file {missing[0]}"
    for name, (size, _) in sorted(recorded.items()):
      actual_size = os.path.getsize(os.path.join(step_dir, name))
      if actual_size != size:
        return f"{name} has {actual_size} bytes, {size} were written"
    for name, (_, digest) in sorted(step_checksums(step_dir, share).items()):
      if name in recorded and recorded[name][1] != digest:
        return f"{name} does not match its checksum (changed on disk)"
    return None

  def verify_together(self, step: int) -> str | None:
    """`verify` by every process at once, each hashing its share of the files; the same answer
    on every process. A collective: every process must call it."""
    if jax.process_count() == 1:
      return self.verify(step)
    problems = _allgather_json(self.verify(step, _share()))
    return next((problem for problem in problems if problem is not None), None)

  def _record(self, step: int) -> None:
    """Writes `step`'s checksum record; every process hashes its share of the files (a
    collective when there are several), process 0 writes."""
    step_dir = self._step_dir(step)
    if jax.process_count() == 1:
      files = step_checksums(step_dir)
    else:
      multihost_utils.sync_global_devices(f"checkpoint {step} complete")  # all files in place
      files = {}
      for share in _allgather_json(step_checksums(step_dir, _share())):
        files.update(share)
    if jax.process_index() == 0:
      os.makedirs(self.checksum_directory, exist_ok=True)
      write_json_atomic(self._record_path(step), {"step": step, "files": dict(sorted(
          files.items()))})
    self._verified.add(step)

  def _delete(self, step: int) -> None:
    self._verified.discard(step)
    shutil.rmtree(self._step_dir(step), ignore_errors=True)
    if os.path.exists(self._record_path(step)):
      os.remove(self._record_path(step))

  def save(self, step: int, state) -> None:
    if step in self.steps():
      if self.verify_together(step) is None:
        return
      # A leftover of this step that never verified (a run stopped before recording its
      # checksum): replace it.
      if jax.process_index() == 0:
        self._delete(step)
      if jax.process_count() > 1:  # nobody saves before the leftover is gone
          multihost_utils.sync_global_devices(f"checkpoint {step} leftover deleted")
      self._manager.reload()
    try:
      with _background_failures_reported_once():
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
      self._record(step)
    except Exception as e:  # pylint: disable=broad-except  (Orbax wraps OS errors in ValueError)
      if jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError):
        raise  # a peer process was lost during the save's barriers, not a disk problem
      older = [s for s in self.steps() if s != step]
      kept = (f"checkpoint {older[0]} is intact" if older else "no earlier checkpoint exists")
      raise CheckpointSaveError(
          f"cannot save checkpoint {step} in {self.directory} ({error_summary(e)}); {kept}: "
          "free space (or fix the file system) and run the same command to resume") from None
    if jax.process_index() == 0:
      self._delete_old(step)
    _return_freed_memory()

  def _delete_old(self, newest: int) -> None:
    """Keeps the `keep` newest verified steps (the new one included); deletes older steps."""
    kept = 0
    for step in self.steps():
      if step > newest:
        continue
      if kept < self.keep and (step in self._verified or self.verify(step) is None):
        kept += 1
        continue
      if kept >= self.keep:  # older than every kept step: safe to delete
        self._delete(step)
    self._manager.reload()

  def saved_leaves(self, step: int) -> dict[str, jax.ShapeDtypeStruct]:
    """`{dotted leaf name: shape and dtype}` of what `step` holds (e.g.
    'method_state.past_predictions.rows')."""
    metadata = ocp.StandardCheckpointer().metadata(
        os.path.join(self._step_dir(step), "default")).item_metadata
    return {leaf.name: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
            for leaf in jax.tree.leaves(metadata)}

  def restore(self, abstract_state=None, adapt=None):
    """The newest step that verifies and restores into `abstract_state`'s shapes and shardings
    (None: the saved tree as plain arrays).

    `adapt(saved_leaves) -> (target, convert)`, if given, chooses per step what to restore into
    (`target`) and how to turn it into `abstract_state`'s layout (`convert`, or None): how a
    checkpoint written on another device count, or with another table layout, is read.

    Returns `(state, step)`. Every skipped step is reported through `log` with the reason.

    Raises:
      NoUsableCheckpoint: steps exist but none verifies and restores.
    """
    self._manager.reload()
    failures = []
    args = (ocp.args.StandardRestore() if abstract_state is None
            else ocp.args.StandardRestore(abstract_state))
    for step in self.steps():
      unrecorded = not os.path.exists(self._record_path(step))
      problem = None if unrecorded else self.verify_together(step)
      if problem is None:
        try:
          if adapt is None:
            state = self._manager.restore(step, args=args)
          else:
            target, convert = adapt(self.saved_leaves(step))
            state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
            state = convert(state) if convert is not None else state
        except Exception as e:  # pylint: disable=broad-except  (any failure: try an older one)
          problem = f"restore failed: {error_summary(e, 200)}"
          if unrecorded:
            problem = f"no checksum record and {problem}"
        else:
          if unrecorded:
            self.log(f"Checkpoint {step} has no checksum record (the run stopped right after "
                     "saving it); restored it unverified and recorded it now")
            self._record(step)
          self._verified.add(step)
          return state, step
      failures.append(f"{step} ({problem})")
      self.log(f"Skipping checkpoint {step}: {problem}")
    raise NoUsableCheckpoint(
        f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
        + "; move the directory away to start over")

  def close(self) -> None:
    self._manager.close()
