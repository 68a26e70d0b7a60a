"""Runs a sequence of read tasks on worker threads, a bounded number ahead, in order."""
import collections
import concurrent.futures
import weakref
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class OrderedReader(Generic[T]):
  """Iterator over the results of `tasks`, computed on background threads.

  At most `buffer_size` tasks are submitted ahead of the consumer, so memory stays bounded and
  the host keeps ahead of the device. Results come back in task order whatever the thread
  timing. An exception raised by a task is re-raised in the consumer (at the position of that
  task) after the reader has shut itself down. Use `close()` or a `with` block to stop early;
  the threads then finish at most the already-submitted reads and exit, so nothing hangs at
  interpreter exit.
  """

  def __init__(self, tasks: Iterable[Callable[[], T]], *, num_workers: int = 2,
               buffer_size: int | None = None, length: int | None = None):
    """Starts reading.

    Args:
      tasks: zero-argument callables, consumed lazily on the consumer's thread.
      num_workers: reader threads.
      buffer_size: results in flight or waiting (default 2 * num_workers).
      length: what `len()` reports, when known.
    """
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self._tasks = iter(tasks)
    self._buffer_size = max(1, buffer_size or 2 * num_workers)
    self._length = length
    self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=num_workers, thread_name_prefix="selfkd-data")
    self._closed = False
    # A reader dropped or left open at exit must not keep threads around; a finalizer (unlike
    # __del__) also runs at interpreter exit while the modules it needs still exist.
    self._finalizer = weakref.finalize(self, _shut_down, self._executor, self._pending)
    self._fill()

  def _fill(self) -> None:
    while not self._closed and len(self._pending) < self._buffer_size:
      task = next(self._tasks, None)
      if task is None:
        return
      self._pending.append(self._executor.submit(task))

  def __iter__(self) -> "OrderedReader[T]":
    return self

  def __next__(self) -> T:
    if not self._pending:
      self.close()
      raise StopIteration
    future = self._pending.popleft()
    self._fill()
    try:
      return future.result()
    except BaseException:
      self.close()
      raise

  def __len__(self) -> int:
    if self._length is None:
      raise TypeError("this reader was not given a length")
    return self._length

  def close(self) -> None:
    """Cancels reads not yet started and waits for the running ones; idempotent."""
    self._closed = True
    self._finalizer()  # Runs _shut_down once, however often close() is called.

  def __enter__(self) -> "OrderedReader[T]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _shut_down(executor: concurrent.futures.ThreadPoolExecutor,
               pending: collections.deque) -> None:
  for future in pending:
    future.cancel()
  pending.clear()
  executor.shutdown(wait=True, cancel_futures=True)
