"""Same-class partners for the trainer's pipeline: `selfkd_jax.partners` over a data source.

The sampler itself (`SameClassPartners`, numpy only) lives in `selfkd_jax.partners` so that a
user's own loop can use it without the trainer's dependencies; this module adds what the
pipeline needs: every label of a source, and data errors (exit 1) instead of value errors.
"""
import numpy as np

from selfkd_jax import partners as partners_lib
from selfkd_jax.data.errors import DataError
from selfkd_jax.files import replaced_atomically

_LABEL_CHUNK = 4096


def source_labels(source, chunk_size: int = _LABEL_CHUNK) -> np.ndarray:
  """All labels of a source, as int32 [len(source)].

  Uses `source.labels` when the source keeps them in memory (`ArraySource`: free). Otherwise
  (`TfdsSource`) reads the whole split once through `get_batch` in chunks of `chunk_size`,
  which decodes every image once: a one-time cost of about one epoch of reading (seconds for
  CIFAR-sized datasets), paid when the partners are built, not per step.
  """
  n = len(source)
  labels = getattr(source, "labels", None)
  if isinstance(labels, np.ndarray) and labels.shape == (n,):
    return labels.astype(np.int32, copy=False)
  if chunk_size < 1:
    raise DataError(f"chunk_size must be positive, got {chunk_size}")
  chunks = [np.asarray(source.get_batch(np.arange(start, min(start + chunk_size, n)))["label"])
            for start in range(0, n, chunk_size)]
  return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros((0,), np.int32)


def cached_source_labels(source, path: str, *, write: bool = True) -> np.ndarray:
  """`source_labels(source)`, kept in the `.npy` file `path` after the first read.

  Reading every label can mean reading every record: an ImageNet-size TFDS split holds the
  JPEGs in the same records, about 140 GB read to find 1.28 M labels. A run that resumes (a
  preempted job, many times over) then reads the file instead. A file of another length than
  the source, or unreadable, is read again and replaced; it is written through a temporary
  file and a rename (`write`: by one process only), so a reader never sees half of it. Labels
  held in memory (`ArraySource`) are used as they are, no file.
  """
  if "labels" in getattr(source, "__dict__", {}):  # an attribute, not a property that reads
    return source_labels(source)
  try:
    labels = np.load(path)
    if labels.shape == (len(source),) and labels.dtype == np.int32:
      return labels
  except (OSError, ValueError, EOFError):
    pass
  labels = source_labels(source)
  if write:
    with replaced_atomically(path, "wb") as f:
      np.save(f, labels)
  return labels


def same_class_partners(labels: np.ndarray, *, seed: int, exclude_self: bool = True
                        ) -> partners_lib.SameClassPartners:
  """`partners.SameClassPartners(labels, ...)`, refusing bad labels with a `DataError`."""
  try:
    return partners_lib.SameClassPartners(labels, seed=seed, exclude_self=exclude_self)
  except ValueError as e:
    raise DataError(str(e)) from None


SameClassPartners = partners_lib.SameClassPartners
partner_hash = partners_lib.partner_hash
