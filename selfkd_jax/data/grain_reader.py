"""Reads a sequence of batches through grain: the reader for TFDS array_record sources.

The batch order stays ours (a pure function of seed and step, see `pipeline`): grain only
runs the reads, on `num_threads` threads a bounded number ahead (and, optionally, in worker
processes with `mp_prefetch`, for sources whose decoding holds the GIL, e.g. PNG/JPEG images
of large datasets). Keeping the order outside grain is what makes resume exact without
checkpointing an iterator.
"""
from typing import Callable, Generic, Sequence, TypeVar

import grain

K = TypeVar("K")
T = TypeVar("T")

READERS = ("auto", "threads", "grain")


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
    self._length = len(keys)
    dataset = grain.MapDataset.source(list(keys)).map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads,
                          prefetch_buffer_size=max(1, buffer_size or 2 * num_threads)))
    if num_processes:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_processes))
    self._iterator = iter(dataset)
    self._remaining = self._length
    self._closed = False

  def __iter__(self) -> "GrainReader[T]":
    return self

  def __next__(self) -> T:
    if self._closed or not self._remaining:
      self.close()
      raise StopIteration
    try:
      value = next(self._iterator)
    except BaseException:  # the end, or a failed read re-raised here: stop grain either way
      self.close()
      raise
    self._remaining -= 1
    return value

  def __len__(self) -> int:
    return self._length

  def close(self) -> None:
    """Stops grain's threads (and processes); idempotent."""
    if not self._closed:
      self._closed = True
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()

  def __enter__(self) -> "GrainReader[T]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def uses_grain(reader: str, source) -> bool:
  """Resolves `config.data.reader`: 'auto' reads TFDS sources with grain, arrays with threads.

  In-memory arrays need no reader at all (a batch is one fancy index), so grain's machinery
  would only add overhead there; TFDS sources read and decode records, which grain overlaps.
  """
  if reader not in READERS:
    raise ValueError(f"reader={reader!r} is not allowed; allowed: {', '.join(READERS)}")
  if reader == "auto":
    from selfkd_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    return isinstance(source, TfdsSource)
  return reader == "grain"
