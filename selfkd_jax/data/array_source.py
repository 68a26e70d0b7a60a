"""A random-access source over in-memory numpy arrays."""
import numpy as np

from selfkd_jax.data.errors import DataError


def check_indices(indices, length: int) -> np.ndarray:
  """Returns `indices` as an int64 array, or raises IndexError if one is outside [0, length).

  Negative indices are refused rather than wrapped: an index is an example's identity, and
  -1 silently meaning the last example would corrupt per-example state.
  """
  indices = np.asarray(indices)
  if indices.size and not np.issubdtype(indices.dtype, np.integer):
    raise IndexError(f"indices must be integers, got dtype {indices.dtype}")
  indices = indices.astype(np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= length):
    raise IndexError(f"indices must lie in [0, {length}), got [{indices.min()}, "
                     f"{indices.max()}]")
  return indices


class ArraySource:
  """Examples `{'image', 'label', 'index'}` held in memory.

  The index of an example is its position in the arrays, so it is stable across runs as long
  as the arrays are built the same way (all loaders here are deterministic).
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    """Wraps the arrays without copying them.

    Args:
      images: uint8 [N, H, W, C].
      labels: integer [N].
    """
    if images.dtype != np.uint8 or images.ndim != 4:
      raise DataError(f"ArraySource needs uint8 images [N, H, W, C], got {images.dtype} "
                      f"{images.shape}; convert the images first")
    if labels.shape != (len(images),):
      raise DataError(f"ArraySource got {len(images)} images but labels of shape "
                      f"{labels.shape}; pass one label per image")
    self.images = images
    self.labels = labels.astype(np.int32, copy=False)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    (i,) = check_indices([index], len(self))
    return {"image": self.images[i], "label": self.labels[i], "index": np.int32(i)}

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the stacked examples at `indices` (one fancy-indexing copy per array)."""
    indices = check_indices(indices, len(self))
    return {"image": self.images[indices], "label": self.labels[indices],
            "index": indices.astype(np.int32)}

  def take(self, n: int) -> "ArraySource":
    """Returns a source over the first `n` examples; their indices stay 0..n-1."""
    return ArraySource(self.images[:n], self.labels[:n])
