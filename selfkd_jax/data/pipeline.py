"""Host-side batching: deterministic epoch order by step, host sharding, padding, device put.

Order is a pure function of (seed, step): the batch of global step `s` is slice
`s % steps_per_epoch` of the permutation of epoch `s // steps_per_epoch`. Every host computes
the same global batch and reads only its contiguous slice, and resuming at any step reproduces
the uninterrupted run exactly, with no iterator state to checkpoint.

Sources that transform examples on the host (`tfds_source.EncodedImageSource`: decode, random
crop) have a `get_train_batch(indices, seed=, epoch=, partners_from=)` whose randomness is a
function of (seed, epoch, index); train batches are read through it, with the epoch of the
step. Their reads can run in grain worker processes (`num_processes`).
"""
import collections
import functools
import os
from typing import Iterable, Iterator

import jax
import numpy as np

from selfkd_jax.data.background import OrderedReader
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.grain_reader import GrainReader, uses_grain
from selfkd_jax.data.pairs import SameClassPartners, same_class_partners, source_labels

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
  """Number of full global batches in an epoch.

  The remainder (num_train % global_batch_size examples) is dropped each epoch, so every step
  has the same shape; since the permutation changes every epoch, a different remainder is
  dropped each time and no example is left out systematically.

  Raises:
    DataError: the batch is larger than the dataset, so an epoch would have no step.
  """
  if global_batch_size < 1:
    raise DataError(f"global batch size must be positive, got {global_batch_size}; fix "
                    "config.batch_size")
  steps = num_train // global_batch_size
  if steps < 1:
    raise DataError(f"global batch size {global_batch_size} is larger than the {num_train} "
                    "train examples; lower config.batch_size or raise limit_train")
  return steps


@functools.lru_cache(maxsize=4)
def _shared_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached because every step of an epoch needs the same permutation; read-only because the
  # cached array is shared between callers and threads.
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  permutation.flags.writeable = False
  return permutation


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the train examples in `epoch`: a permutation of 0..num_examples-1.

  It depends only on its arguments (numpy's PCG64 seeded with [seed, epoch]), so all hosts
  agree without communicating. seed and epoch must be non-negative.
  """
  if seed < 0 or epoch < 0:
    raise DataError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
  return _shared_permutation(int(seed), int(epoch), int(num_examples)).copy()


AUTO_MAX_WORKERS = 16


def num_processes_for(workers: int, source, reader: str = "auto") -> int:
  """Resolves `config.data.workers` for `source`: the grain worker processes to read it with.

  Only sources that transform on the host (`get_train_batch`: decoding, cropping) read by grain
  get any; every other source is read as before, in this process. 0 = none; -1 = auto: one
  worker per core the process may run on, less one for the trainer, at most 16
  (`AUTO_MAX_WORKERS`); none on 1 or 2 cores, where the main process's two reader threads
  decode as fast (PIL releases the GIL while it decodes and resizes: 720 vs 370 images/s with
  one worker on 2 cores, benchmarks/README.md).
  """
  if not hasattr(source, "get_train_batch") or not uses_grain(reader, source):
    return 0
  if workers >= 0:
    return workers
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = cores or 1
  return 0 if cores <= 2 else min(cores - 1, AUTO_MAX_WORKERS)


def _read_train(source, indices: np.ndarray, seed: int, epoch: int,
                partners_from: int | None = None) -> Batch:
  get_train_batch = getattr(source, "get_train_batch", None)
  if get_train_batch is None:
    return source.get_batch(indices)
  return get_train_batch(indices, seed=seed, epoch=epoch, partners_from=partners_from)


def train_batch_indices(seed: int, step: int, num_examples: int,
                        global_batch_size: int) -> np.ndarray:
  """Dataset indices [global_batch_size] of the global batch at `step` (random access)."""
  epoch, position = divmod(step, steps_per_epoch(num_examples, global_batch_size))
  if seed < 0 or epoch < 0:
    raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
  permutation = _shared_permutation(int(seed), int(epoch), int(num_examples))
  start = position * global_batch_size
  return permutation[start:start + global_batch_size].copy()


def _host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{process_count} processes; make config.batch_size a multiple of it")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _reader(read, keys: range, *, source, reader: str, num_workers: int,
            buffer_size: int | None, num_processes: int = 0):
  """Reads `read(key)` for `keys` in order on background threads, ours or grain's, or in
  grain's worker processes."""
  if uses_grain(reader, source):
    return GrainReader(read, keys, num_threads=num_workers, buffer_size=buffer_size,
                       num_processes=num_processes)
  if num_processes:
    raise DataError(f"num_processes={num_processes} needs the grain reader, but reader="
                    f"{reader!r} reads on threads; use reader 'auto' or 'grain', or 0 processes")
  return OrderedReader((functools.partial(read, k) for k in keys), num_workers=num_workers,
                       buffer_size=buffer_size, length=len(keys))


class TrainBatches:
  """Host-local train batches of global steps start_step .. num_steps-1.

  Yields `{'image': uint8 [b, H, W, C], 'label': int32 [b], 'index': int32 [b]}` with
  b = global_batch_size // process_count: this host's contiguous slice of the global batch.
  Reads run on background threads (`OrderedReader`, or grain's for `reader='grain'`); close it
  or use `with`.

  With `partners`, every batch also has `'partner_image'` (uint8, like 'image'),
  `'partner_label'` (equal to 'label') and `'partner_index'` (int32): for each anchor a
  same-class partner (`pairs.SameClassPartners`, keyed by (seed, step, anchor index)), read in
  the same background read as the anchors, for CS-KD.
  """

  def __init__(self, source, *, seed: int, global_batch_size: int, start_step: int,
               num_steps: int, process_index: int = 0, process_count: int = 1,
               num_workers: int = 2, buffer_size: int | None = None, reader: str = "auto",
               partners: "SameClassPartners | bool" = False, num_processes: int = 0):
    """Starts reading.

    Args:
      source: anything with `__len__` and `get_batch(indices)` (see `load_splits`).
      seed: data-order seed, shared by all hosts.
      global_batch_size: examples per step summed over all hosts.
      start_step: first global step to yield (e.g. the restored step on resume).
      num_steps: total steps of the run; the last yielded step is num_steps - 1.
      process_index: this host (jax.process_index()).
      process_count: number of hosts (jax.process_count()).
      num_workers: reader threads.
      buffer_size: batches read ahead (default 2 * num_workers).
      reader: 'threads', 'grain', or 'auto' (grain for TFDS sources; see `grain_reader`).
        The batches are the same whichever reads them.
      partners: False (default: no partners); True pairs every anchor with a same-class
        partner drawn with `seed` (building `SameClassPartners(source_labels(source), seed)`,
        which reads all labels once when the source does not hold them); or a
        `SameClassPartners` built for this source (to choose its seed or `exclude_self`, or to
        share one across iterators). The global batch still has `global_batch_size` anchors;
        the partners double the images read.
      num_processes: grain worker processes running the reads (with their host transforms);
        0 = read in this process. Needs the grain reader. The batches are the same for any
        number.
    """
    num_examples = len(source)
    spe = steps_per_epoch(num_examples, global_batch_size)  # Fail here, not in a worker.
    if not 0 <= start_step <= num_steps:
      raise DataError(f"start_step {start_step} must lie in [0, num_steps={num_steps}]")
    host = _host_slice(global_batch_size, process_index, process_count)
    if partners is True:
      partners = same_class_partners(source_labels(source), seed=seed)
    elif partners is not False and partners is not None:
      if not isinstance(partners, SameClassPartners):
        raise DataError(f"partners must be a bool or a SameClassPartners, got "
                        f"{type(partners).__name__}")
      if len(partners) != num_examples:
        raise DataError(f"partners were built for {len(partners)} examples but the source has "
                        f"{num_examples}; build them from this source's labels")
    else:
      partners = None

    def read(step: int) -> Batch:
      indices = train_batch_indices(seed, step, num_examples, global_batch_size)[host]
      if partners is None:
        return _read_train(source, indices, seed, step // spe)
      # One read of anchors and partners together, split afterwards.
      both = _read_train(source, np.concatenate([indices, partners.partners(indices, step)]),
                         seed, step // spe, partners_from=len(indices))
      b = len(indices)
      batch = {key: value[:b] for key, value in both.items()}
      batch.update({f"partner_{key}": value[b:] for key, value in both.items()})
      return batch

    self._reader = _reader(read, range(start_step, num_steps), source=source, reader=reader,
                           num_workers=num_workers, buffer_size=buffer_size,
                           num_processes=num_processes)

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> Batch:
    return next(self._reader)

  def __len__(self) -> int:
    return len(self._reader)

  def close(self) -> None:
    self._reader.close()

  def __enter__(self) -> "TrainBatches":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def eval_batches(source, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 2, reader: str = "auto",
                 num_processes: int = 0):
  """Host-local batches covering the split once, in order, with a padding mask.

  The global batches are consecutive runs of indices; the last is padded to full size so
  that every step has the same shape on every host. Padding rows have mask 0, a zero image,
  label 0 and index 0. Metrics weighted by 'mask' therefore count each example exactly once,
  whatever the number of devices and hosts.

  Host-transforming sources give their eval view here (`get_batch`: resize, centre crop).

  Returns:
    A reader (iterable, closeable, with len; `reader` and `num_processes` as in
    `TrainBatches`) of
    `{'image', 'label', 'index', 'mask'}` (mask float32 [b], 1 real, 0 padding).
  """
  num_examples = len(source)
  if global_batch_size < 1:
    raise DataError(f"eval batch size must be positive, got {global_batch_size}")
  host = _host_slice(global_batch_size, process_index, process_count)
  num_batches = -(-num_examples // global_batch_size)

  def read(batch_number: int) -> Batch:
    positions = np.arange(batch_number * global_batch_size,
                          (batch_number + 1) * global_batch_size)[host]
    real = positions < num_examples
    # Padding rows re-read example 0 so every source needs only get_batch, then get blanked.
    batch = source.get_batch(np.where(real, positions, 0))
    for key, value in batch.items():
      batch[key] = np.where(real.reshape((-1,) + (1,) * (value.ndim - 1)), value,
                            np.zeros((), value.dtype))
    batch["mask"] = real.astype(np.float32)
    return batch

  return _reader(read, range(num_batches), source=source, reader=reader,
                 num_workers=num_workers, buffer_size=None, num_processes=num_processes)


def prefetch_to_device(iterator: Iterable[Batch], sharding: jax.sharding.Sharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Turns host-local numpy batches into global arrays sharded on the batch axis.

  Each host passes its own slice; `jax.make_array_from_process_local_data` assembles the
  global array (global batch = sum of the host slices), so the same code runs on one or many
  hosts. Transfers are asynchronous; keeping `size` batches in flight overlaps them with
  compute. Closing this generator closes `iterator` when it can be closed.

  Args:
    iterator: host-local batches (dicts of numpy arrays, batch axis first).
    sharding: sharding of every array, e.g. NamedSharding(mesh, PartitionSpec('data')).
    size: batches transferred ahead of the consumer.

  Yields:
    The same dicts with global `jax.Array` values.
  """
  batches = iter(iterator)
  in_flight = collections.deque()

  def enqueue(n: int) -> None:
    for _ in range(n):
      batch = next(batches, None)
      if batch is None:
        return
      in_flight.append(jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, x), batch))

  try:
    enqueue(max(1, size))
    while in_flight:
      yield in_flight.popleft()
      enqueue(1)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
