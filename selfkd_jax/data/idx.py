"""Reader for the IDX format of MNIST and Fashion-MNIST (`*-ubyte` files, optionally gzipped).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order. Only unsigned bytes (type code
0x08) occur in these datasets, so that is all this reader accepts.
"""
import gzip
import os
import zlib

import numpy as np

from selfkd_jax.data.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, H, W).
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,).

_GZIP_SIGNATURE = b"\x1f\x8b"
_HOW_TO_GET = ("install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
               "(files in /usr/share/datasets/fashion-mnist) or set config.data.dir to a folder "
               "holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")


def _read_bytes(path: str) -> bytes:
  """Returns the decompressed content of `path`, gzipped or not."""
  if not os.path.isfile(path):
    raise DataError(f"IDX file {path!r} does not exist; {_HOW_TO_GET}")
  with open(path, "rb") as f:
    raw = f.read()
  # Sniff the gzip signature rather than trusting the extension: the Debian files are
  # gzipped, while copies people unpack by hand keep names with or without `.gz`.
  if not raw.startswith(_GZIP_SIGNATURE):
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"IDX file {path!r} is not a valid gzip file ({e}); delete it and "
                    f"reinstall or re-download it ({_HOW_TO_GET})") from None


def _read_idx(path: str, expected_magic: int, expected_ndim: int) -> np.ndarray:
  data = _read_bytes(path)
  if len(data) < 4:
    raise DataError(f"IDX file {path!r} has only {len(data)} bytes, too short for a header; "
                    f"replace it ({_HOW_TO_GET})")
  magic = int.from_bytes(data[:4], "big")
  if magic != expected_magic:
    raise DataError(f"IDX file {path!r} has magic number {magic}, expected {expected_magic} "
                    f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'}); check that "
                    "the file is the right one and not damaged")
  header_size = 4 + 4 * expected_ndim
  if len(data) < header_size:
    raise DataError(f"IDX file {path!r} is truncated inside its header; replace it "
                    f"({_HOW_TO_GET})")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(expected_ndim))
  expected_bytes = header_size + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected_bytes:
    problem = "truncated" if len(data) < expected_bytes else "longer than its header says"
    raise DataError(f"IDX file {path!r} is {problem}: header declares shape {shape} "
                    f"({expected_bytes} bytes) but it holds {len(data)} bytes; replace it "
                    f"({_HOW_TO_GET})")
  # Copy so the array owns writable memory instead of viewing the immutable bytes object.
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def read_idx_images(path: str) -> np.ndarray:
  """Reads an IDX image file.

  Args:
    path: a `*-images-idx3-ubyte` file, gzipped or not.

  Returns:
    uint8 array [N, H, W].

  Raises:
    DataError: the file is missing, not valid gzip, has the wrong magic number, or its size
      does not match the shape its header declares.
  """
  return _read_idx(path, IMAGES_MAGIC, 3)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads an IDX label file.

  Args:
    path: a `*-labels-idx1-ubyte` file, gzipped or not.

  Returns:
    uint8 array [N].

  Raises:
    DataError: as for `read_idx_images`.
  """
  return _read_idx(path, LABELS_MAGIC, 1)


def check_images_and_labels(images: np.ndarray, labels: np.ndarray, num_classes: int,
                            what: str) -> None:
  """Checks that images and labels pair up and that every label is a valid class id.

  Args:
    images: [N, ...] array.
    labels: [N] integer array.
    num_classes: labels must lie in [0, num_classes).
    what: names the data in the error message (e.g. the two file paths).

  Raises:
    DataError: the counts differ or a label is out of range.
  """
  if len(images) != len(labels):
    raise DataError(f"{what}: {len(images)} images but {len(labels)} labels; the image and "
                    "label files do not belong together, replace them")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{what}: labels range over [{labels.min()}, {labels.max()}] but must lie "
                    f"in [0, {num_classes}); the label file is damaged or of another dataset")
