"""Reads a sequence of batches through grain: the reader for TFDS array_record sources.

The batch order stays ours (a pure function of seed and step, see `pipeline`): grain only
runs the reads, on `num_threads` threads a bounded number ahead (and, optionally, in worker
processes with `mp_prefetch`, for sources that decode and crop on the host, e.g. the JPEG
images of `tfds_source.EncodedImageSource`). Keeping the order outside grain is what makes
resume exact without checkpointing an iterator.

With worker processes, worker k of W reads the keys k, k + W, k + 2W, ... (grain's slicing of
the key list) and grain hands the results back in key order, so the sequence is the same
whatever W is. Each worker reads one batch at a time and keeps at most two more ready (its
read-ahead and its queue), so host memory holds a few batches per worker. The workers never
act on SIGINT or SIGTERM (a Ctrl-C or a preemption notice to the process group is the
trainer's to handle: it saves, then stops the reads itself) and exit by themselves when the
process that started them dies.
"""
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

from selfkd_jax.data.errors import DataError

K = TypeVar("K")
T = TypeVar("T")

READERS = ("auto", "threads", "grain")


def _import_grain():
  """grain, imported when a reader first needs it: arrays are read with threads, so a machine
  without grain (a GPU image with JAX but not this project's data stack, say) still trains on
  them, and the trainer's modules import there."""
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise DataError(f"config.data.reader: reading with grain needs the 'grain' package ({error});"
                    " install it (pip install 'grain>=0.2.18') or set "
                    "--config.data.reader=threads") from None
  return grain


class GrainReader(Generic[T]):
  """Iterator over `read(key)` for `keys`, in order, read ahead by grain.

  Same interface as `background.OrderedReader`: iterable, `len()`, `close()`, a `with` block.
  An exception raised by `read` is re-raised in the consumer at that key's position.
  """

  def __init__(self, read: Callable[[K], T], keys: Sequence[K], *, num_threads: int = 2,
               buffer_size: int | None = None, num_processes: int = 0):
    """Starts reading.

    Args:
      read: maps one key (a step or batch number) to a batch; must be picklable when
        `num_processes > 0`.
      keys: the keys to read, in order.
      num_threads: grain reader threads.
      buffer_size: batches read ahead (default 2 * num_threads).
      num_processes: grain worker processes (0 = read in this process).
    """
    if num_threads < 1:
      raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if num_processes < 0:
      raise ValueError(f"num_processes must be >= 0, got {num_processes}")
    grain = _import_grain()
    self._length = len(keys)
    self._num_processes = num_processes
    if num_processes:
      # In each worker: one read at a time, one result ahead (memory: ~2 batches a worker).
      num_threads, buffer_size = 1, 1
    dataset = grain.MapDataset.source(list(keys)).map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads,
                          prefetch_buffer_size=max(1, buffer_size or 2 * num_threads)))
    if num_processes:
      _mark_flags_parsed()
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=num_processes, per_worker_buffer_size=1),
          worker_init_fn=_init_worker)
    with _stop_signals_blocked(num_processes):
      self._iterator = iter(dataset)
    self._started = False
    self._remaining = self._length
    self._closed = False

  def __iter__(self) -> "GrainReader[T]":
    return self

  def __next__(self) -> T:
    if self._closed or not self._remaining:
      self.close()
      raise StopIteration
    error = None
    try:
      if self._started:
        value = next(self._iterator)
      else:  # grain starts its threads, and they the worker processes, in the first read
        self._started = True
        with _stop_signals_blocked(self._num_processes):
          value = next(self._iterator)
    except DataError as e:  # a read's one-line error (a corrupt image, ...)
      error = e
    except RuntimeError as e:
      if self._num_processes and "Worker process" in str(e):  # killed (OOM, a signal), crashed
        error = DataError(f"an input worker process died ({str(e).splitlines()[0]}); rerun the "
                          "same command to resume, with fewer config.data.workers if memory "
                          "ran out")
      else:
        self.close()
        raise
    except BaseException:  # the end, or another failed read re-raised here: stop grain
      self.close()
      raise
    if error is not None:
      # Raised without grain's frames: they hold the last results (shared memory that could
      # then not be unlinked before exit); the message says all there is to say.
      error.__traceback__ = None
      self.close()
      raise error
    self._remaining -= 1
    return _own_memory(value) if self._num_processes else value

  def __len__(self) -> int:
    return self._length

  def close(self) -> None:
    """Stops grain's threads (and processes); idempotent."""
    if not self._closed:
      self._closed = True
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      # Dropped now, while the interpreter is whole: grain's iterators close themselves again
      # when collected, which fails noisily during interpreter shutdown.
      self._iterator = None
      if self._num_processes:
        # grain's iterators keep the last result in a reference cycle: collected now, its
        # shared-memory block is unlinked now, not reported leaked at exit.
        gc.collect()
        _wait_for_shared_memory_unlinks()

  def __enter__(self) -> "GrainReader[T]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _wait_for_shared_memory_unlinks() -> None:
  """Returns once grain has unlinked every shared-memory block already dropped.

  grain unlinks a block on a thread pool of its own (`SharedMemoryArray.enable_async_del`,
  one thread, tasks in order). At exit that pool is terminated with its queue: an unlink
  still queued is never done, and multiprocessing's resource tracker then prints a "leaked
  shared_memory objects" warning after the run's last line (seen in 1 of 12 runs ending on a
  corrupt image). A no-op queued behind them and waited for is the barrier. The pool is
  grain's private attribute, so it is looked up defensively: without it there is nothing to
  wait for (deletion is synchronous).
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  pool = getattr(getattr(shared_memory_array, "SharedMemoryArray", None), "_del_thread_pool",
                 None)
  if pool is not None:
    pool.apply(int)


def _own_memory(value):
  """`value` with its arrays copied out of grain's shared memory into ordinary arrays.

  A worker's result arrives in shared-memory blocks that are unlinked when their array is
  collected. Held by the consumer (a batch in flight, a traceback) until interpreter shutdown,
  they would be collected too late to unlink: "leaked shared_memory objects" warnings and
  blocks left in /dev/shm. One copy per batch releases them at once.
  """
  if isinstance(value, dict):
    return {key: _own_memory(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_own_memory(item) for item in value)
  if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
    return np.array(value)
  return value


def _mark_flags_parsed() -> None:
  """grain's worker processes read absl flags (with their defaults): outside an absl program
  (tests, notebooks, a user's own script) nothing has parsed them yet."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked(num_processes: int):
  """With worker processes: SIGINT and SIGTERM blocked in this thread meanwhile.

  The threads it starts inherit its signal mask, the processes they spawn inherit theirs, and
  the mask survives exec: a worker is born with both signals blocked, so a Ctrl-C or a
  preemption notice sent to the whole process group cannot kill it while it is still starting
  (importing for a second or two), before `_init_worker` ignores them. This process still
  takes the signal: the kernel hands it to a thread that does not block it (or delivers it
  when the mask is restored), and Python runs the handler in the main thread as always.
  """
  if not num_processes or not hasattr(signal, "pthread_sigmask"):
    yield
    return
  # multiprocessing starts its resource tracker with the same trick, then UNblocks both
  # signals: started first, it is found running later and leaves the mask alone.
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  resource_tracker.ensure_running()
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs first in every grain worker process."""
  del worker_index, worker_count
  # The trainer handles SIGINT/SIGTERM (checkpoint, then stop) and closes the reader, which
  # stops the workers; a signal sent to the whole process group must not kill them first.
  for signum in _STOP_SIGNALS:  # (blocked since birth: see _stop_signals_blocked)
    signal.signal(signum, signal.SIG_IGN)
  parent = multiprocessing.parent_process()
  if parent is not None:
    # grain has no parent-death check: without this, a SIGKILLed or crashed trainer would leave
    # its workers waiting on a queue forever. The sentinel becomes ready when the parent dies.
    def exit_with_parent():
      multiprocessing.connection.wait([parent.sentinel])
      os._exit(1)  # pylint: disable=protected-access

    threading.Thread(target=exit_with_parent, daemon=True, name="selfkd-parent-watch").start()


def uses_grain(reader: str, source) -> bool:
  """Resolves `config.data.reader`: 'auto' reads TFDS sources with grain, arrays with threads.

  In-memory arrays need no reader at all (a batch is one fancy index), so grain's machinery
  would only add overhead there; TFDS sources read and decode records, which grain overlaps.
  """
  if reader not in READERS:
    raise ValueError(f"reader={reader!r} is not allowed; allowed: {', '.join(READERS)}")
  if reader == "auto":
    from selfkd_jax.data.tfds_source import (  # pylint: disable=g-import-not-at-top
        EncodedImageSource, TfdsSource)
    return isinstance(source, (TfdsSource, EncodedImageSource))
  return reader == "grain"
