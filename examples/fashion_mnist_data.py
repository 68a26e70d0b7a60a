"""Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist`, with numpy only.

Shared by the examples. Written here rather than imported from `selfkd_jax.data`, whose package
pulls in grain: the examples need only what `pip install -e .` installs.
"""

import gzip
import os

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> np.ndarray:
  """An IDX file (`*-ubyte.gz`) as a uint8 array."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  # Header: two zero bytes, the type code (0x08: unsigned bytes), the number of dimensions,
  # then one big-endian uint32 per dimension.
  if data[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path} is not an IDX file of unsigned bytes")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix: str, limit: int = 0, data_dir: str = DATA_DIR):
  """`(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N])` of the first `limit`
  examples (0: all) of split `prefix` ('train' or 't10k').

  An example's position in the training split is its `index`, what PS-KD's table and CS-KD's
  partners are keyed by.
  """
  images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
  limit = limit or len(labels)
  return (images[:limit, :, :, None].astype(np.float32) / 255.0,
          labels[:limit].astype(np.int32))


def load_fashion_mnist(data_dir: str = DATA_DIR, limit_train: int = 0, limit_test: int = 0):
  """Train and test splits as dicts of 'image' (float32 [N, 28, 28, 1]) and 'label' (int32)."""
  return tuple(dict(zip(("image", "label"), load_split(prefix, limit, data_dir)))
               for prefix, limit in (("train", limit_train), ("t10k", limit_test)))
