"""IDX reading: the real Fashion-MNIST files and every way a file can be broken."""
import gzip
import os

import numpy as np
import pytest

from selfkd_jax import data
from selfkd_jax.data import idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, magic, shape, payload, compress=True):
  content = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in shape)
  content += bytes(payload)
  with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
    f.write(content)
  return str(path)


def _assert_one_line_naming(error_info, path):
  message = str(error_info.value)
  assert str(path) in message
  assert "\n" not in message


@pytest.fixture(scope="module")
def fashion():
  return data.load_splits("fashion_mnist")


def test_fashion_mnist_shapes_and_labels(fashion):
  train, test, info = fashion
  assert (len(train), len(test)) == (60000, 10000)
  assert info.num_train == 60000 and info.num_test == 10000
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  batch = train.get_batch(np.arange(5))
  assert batch["image"].shape == (5, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
  # The published dataset: 6000 train / 1000 test images per class, first labels known.
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
  np.testing.assert_array_equal(train.labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  assert train.labels.min() == 0 and train.labels.max() == 9
  assert int(train.images.sum(dtype=np.int64)) == 3431114169


def test_fashion_mnist_stats_match_data(fashion):
  train, _, info = fashion
  scaled = train.images[:10000].astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, [scaled.mean()], atol=2e-3)
  np.testing.assert_allclose(info.std, [scaled.std()], atol=2e-3)
  assert info.flip is True and info.crop_padding == 2


def test_roundtrip_gz_and_plain(tmp_path):
  values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  gz = _write_idx(tmp_path / "a.gz", idx.IMAGES_MAGIC, values.shape, values.tobytes())
  plain = _write_idx(tmp_path / "a", idx.IMAGES_MAGIC, values.shape, values.tobytes(),
                     compress=False)
  np.testing.assert_array_equal(idx.read_idx_images(gz), values)
  np.testing.assert_array_equal(idx.read_idx_images(plain), values)
  labels = _write_idx(tmp_path / "l.gz", idx.LABELS_MAGIC, (3,), [7, 0, 2])
  np.testing.assert_array_equal(idx.read_idx_labels(labels), [7, 0, 2])


def test_truncated_file(tmp_path):
  path = _write_idx(tmp_path / "train-images-idx3-ubyte.gz", idx.IMAGES_MAGIC, (3, 4, 4),
                    np.zeros(40, np.uint8))
  with pytest.raises(data.DataError, match="truncated") as error:
    idx.read_idx_images(path)
  _assert_one_line_naming(error, path)


def test_trailing_bytes(tmp_path):
  path = _write_idx(tmp_path / "labels.gz", idx.LABELS_MAGIC, (3,), [1, 2, 3, 4])
  with pytest.raises(data.DataError, match="longer") as error:
    idx.read_idx_labels(path)
  _assert_one_line_naming(error, path)


def test_wrong_magic(tmp_path):
  # A label file passed where images are expected.
  path = _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", idx.LABELS_MAGIC, (3,), [1, 2, 3])
  with pytest.raises(data.DataError, match="magic number 2049") as error:
    idx.read_idx_images(path)
  _assert_one_line_naming(error, path)


def test_corrupt_gzip(tmp_path):
  good = gzip.compress(os.urandom(5000))
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(good[:20] + b"\x00" * 50 + good[70:])  # Keeps the signature, breaks the body.
  with pytest.raises(data.DataError, match="gzip") as error:
    idx.read_idx_images(str(path))
  _assert_one_line_naming(error, path)
  path.write_bytes(good[: len(good) // 2])  # A download cut short.
  with pytest.raises(data.DataError, match="gzip") as error:
    idx.read_idx_images(str(path))
  _assert_one_line_naming(error, path)


def test_missing_file(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist") as error:
    idx.read_idx_images(str(path))
  _assert_one_line_naming(error, path)
  assert "config.data.dir" in str(error.value)


def test_load_splits_missing_dir_names_file(tmp_path):
  with pytest.raises(data.DataError, match="does not exist") as error:
    data.load_splits("fashion_mnist", data_dir=str(tmp_path))
  _assert_one_line_naming(error, tmp_path / "train-images-idx3-ubyte.gz")


def _write_dataset(folder, train_images, train_labels, test_images, test_labels):
  for prefix, images, labels in (("train", train_images, train_labels),
                                 ("t10k", test_images, test_labels)):
    _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", idx.IMAGES_MAGIC, images.shape,
               images.tobytes())
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", idx.LABELS_MAGIC, labels.shape,
               labels.tobytes())


def test_count_mismatch(tmp_path):
  images = np.zeros((4, 5, 5), np.uint8)
  _write_dataset(tmp_path, images, np.zeros(3, np.uint8), images, np.zeros(4, np.uint8))
  with pytest.raises(data.DataError, match="4 images but 3 labels") as error:
    data.load_splits("fashion_mnist", data_dir=str(tmp_path))
  _assert_one_line_naming(error, tmp_path / "train-labels-idx1-ubyte.gz")


def test_label_out_of_range(tmp_path):
  images = np.zeros((4, 5, 5), np.uint8)
  _write_dataset(tmp_path, images, np.array([0, 1, 10, 2], np.uint8), images,
                 np.zeros(4, np.uint8))
  with pytest.raises(data.DataError, match=r"\[0, 10\)") as error:
    data.load_splits("fashion_mnist", data_dir=str(tmp_path))
  _assert_one_line_naming(error, tmp_path / "train-labels-idx1-ubyte.gz")


def test_small_idx_dataset_and_mnist_from_idx(tmp_path):
  rng = np.random.default_rng(0)
  train_images = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
  test_images = rng.integers(0, 256, (2, 5, 5), dtype=np.uint8)
  train_labels = np.array([0, 1, 2, 3, 4, 9], np.uint8)
  _write_dataset(tmp_path, train_images, train_labels, test_images, np.array([5, 6], np.uint8))
  train, test, info = data.load_splits("mnist", data_dir=str(tmp_path))
  assert info.name == "mnist" and info.flip is False and info.image_shape == (5, 5, 1)
  assert (info.num_train, info.num_test) == (6, 2)
  np.testing.assert_array_equal(train.get_batch(np.arange(6))["image"][..., 0], train_images)
  np.testing.assert_array_equal(test.get_batch([1])["label"], [6])
