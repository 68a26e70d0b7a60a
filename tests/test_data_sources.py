"""load_splits: the embedded datasets, limit_train, and the TFDS path (never downloading)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from selfkd_jax import data
from selfkd_jax.data import TrainBatches


def test_embedded_names():
  assert set(data.DATASET_NAMES) == {"fashion_mnist", "digits", "synthetic"}


def test_digits_split():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  train, test, info = data.load_splits("digits")
  assert (len(train), len(test)) == (1497, 300)
  assert (info.num_train, info.num_test, info.num_classes) == (1497, 300, 10)
  assert info.image_shape == (8, 8, 1) and info.flip is False and info.crop_padding == 0
  assert train.images.dtype == np.uint8 and train.images.max() == 255
  # The split partitions sklearn's digits: every label count adds up.
  target = datasets.load_digits().target
  np.testing.assert_array_equal(np.bincount(train.labels) + np.bincount(test.labels),
                                np.bincount(target))
  # Deterministic: a second load gives the same split.
  train_again, test_again, _ = data.load_splits("digits")
  np.testing.assert_array_equal(train.images, train_again.images)
  np.testing.assert_array_equal(test.labels, test_again.labels)
  np.testing.assert_allclose(info.mean, [train.images.mean() / 255], rtol=1e-6)


def test_synthetic_defaults_and_kwargs():
  train, test, info = data.load_splits("synthetic")
  assert (len(train), len(test)) == (2048, 512)
  assert info.image_shape == (32, 32, 3) and info.num_classes == 100
  train, test, info = data.load_splits("synthetic", synthetic_shape=(8, 6, 2),
                                       synthetic_classes=5, synthetic_train=40,
                                       synthetic_test=10)
  assert train.get_batch(np.arange(3))["image"].shape == (3, 8, 6, 2)
  assert (info.num_train, info.num_test, info.num_classes) == (40, 10, 5)
  assert set(np.unique(train.labels)) == set(range(5))
  again, _, _ = data.load_splits("synthetic", synthetic_shape=(8, 6, 2), synthetic_classes=5,
                                 synthetic_train=40, synthetic_test=10)
  np.testing.assert_array_equal(train.images, again.images)


def test_synthetic_is_learnable():
  train, test, info = data.load_splits("synthetic", synthetic_classes=20, synthetic_train=400,
                                       synthetic_test=200)
  flat_train = train.images.reshape(len(train), -1).astype(np.float32)
  centroids = np.stack([flat_train[train.labels == c].mean(0) for c in range(20)])
  flat_test = test.images.reshape(len(test), -1).astype(np.float32)
  distances = ((flat_test[:, None] - centroids[None]) ** 2).sum(-1)
  accuracy = (distances.argmin(1) == test.labels).mean()
  assert accuracy > 0.9  # Chance is 0.05.


def test_limit_train_keeps_first_indices():
  full, _, _ = data.load_splits("digits")
  train, test, info = data.load_splits("digits", limit_train=100)
  assert len(train) == 100 and info.num_train == 100 and len(test) == 300
  batch = train.get_batch(np.arange(100))
  np.testing.assert_array_equal(batch["index"], np.arange(100))
  np.testing.assert_array_equal(batch["image"], full.images[:100])
  np.testing.assert_array_equal(batch["label"], full.labels[:100])
  with pytest.raises(IndexError):
    train.get_batch(np.array([100]))
  # A limit above the dataset size keeps everything.
  assert len(data.load_splits("digits", limit_train=10**6)[0]) == 1497
  with pytest.raises(data.DataError, match="limit_train"):
    data.load_splits("digits", limit_train=0)


def test_array_source_items():
  source = data.ArraySource(np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1),
                            np.array([4, 5, 6]))
  item = source[2]
  assert set(item) == {"image", "label", "index"}
  assert item["label"] == 6 and item["index"] == 2 and item["image"][0, 0, 0] == 8
  batch = source.get_batch(np.array([2, 0]))
  np.testing.assert_array_equal(batch["label"], [6, 4])
  np.testing.assert_array_equal(batch["index"], [2, 0])
  with pytest.raises(IndexError):
    source[-1]  # An index is an identity: no wrap-around.
  with pytest.raises(IndexError):
    source.get_batch(np.array([0, 3]))


def test_tfds_not_prepared_fails_fast(tmp_path):
  with pytest.raises(data.DataError) as error:
    data.load_splits("cifar100", data_dir=str(tmp_path))
  message = str(error.value)
  assert "'cifar100' is not prepared under" in message and str(tmp_path) in message
  assert "tfds build cifar100" in message and "config.data.dir" in message
  assert "\n" not in message
  assert not any(tmp_path.iterdir())  # Nothing was downloaded or prepared.
  # ImageNet cannot be downloaded by TFDS: the line says where its archives go.
  with pytest.raises(data.DataError,
                     match=r"ILSVRC2012_img_train.tar .* --manual_dir=<that folder>") as error:
    data.load_splits("imagenet2012", data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


def test_unknown_name_lists_embedded(tmp_path):
  with pytest.raises(data.DataError, match="fashion_mnist, digits, synthetic") as error:
    data.load_splits("no_such_dataset_xyz", data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


# Tiny TFDS datasets prepared locally in array_record format (no TensorFlow, no network).
# Builders register themselves by class name when the class is created.
class SelfkdTinyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  SHAPE = (6, 5, 3)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=self.SHAPE, dtype=np.uint8,
                                      encoding="bytes" if None in self.SHAPE else "none"),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12, 0), "test": self._generate_examples(5, 1)}

  def _generate_examples(self, n, seed):
    for i in range(n):
      yield i, {"image": tiny_image(seed, i, self.SHAPE), "label": i % 3}


class SelfkdTinyVariable(SelfkdTinyImages):
  SHAPE = (None, None, 3)

  def _generate_examples(self, n, seed):
    for i in range(n):
      yield i, {"image": tiny_image(seed, i, (4 + i % 2, 4, 3)), "label": i % 3}


def tiny_image(seed, i, shape):
  return np.random.default_rng([seed, i]).integers(0, 256, shape, dtype=np.uint8)


def _prepare(name, data_dir):
  tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format="array_record")


def test_tfds_prepared_dataset(tmp_path):
  _prepare("selfkd_tiny_images", str(tmp_path))
  train, test, info = data.load_splits("selfkd_tiny_images", data_dir=str(tmp_path))
  assert (len(train), len(test), info.num_classes) == (12, 5, 3)
  assert info.image_shape == (6, 5, 3) and (info.num_train, info.num_test) == (12, 5)
  assert len(info.mean) == 3 and info.flip is False and info.crop_padding == 0
  # TFDS keeps its own example order; our index must be the position in that order.
  records = [train._data_source[i] for i in range(12)]  # pylint: disable=protected-access
  batch = train.get_batch(np.array([7, 2, 11]))
  np.testing.assert_array_equal(batch["index"], [7, 2, 11])
  for row, i in enumerate([7, 2, 11]):
    np.testing.assert_array_equal(batch["image"][row], records[i]["image"])
    assert batch["label"][row] == records[i]["label"]
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  item = test[4]
  assert item["image"].shape == (6, 5, 3) and item["index"] == 4
  # The generated examples are all there.
  expected = sorted(tiny_image(0, i, (6, 5, 3)).tobytes() for i in range(12))
  got = sorted(image.tobytes() for image in train.get_batch(np.arange(12))["image"])
  assert got == expected
  # limit_train and background reading (grain, the 'auto' reader of TFDS sources) work.
  limited, _, limited_info = data.load_splits("selfkd_tiny_images", data_dir=str(tmp_path),
                                              limit_train=8)
  assert len(limited) == 8 and limited_info.num_train == 8
  from selfkd_jax.data import grain_reader
  assert grain_reader.uses_grain("auto", limited)
  with TrainBatches(limited, seed=0, global_batch_size=4, start_step=0, num_steps=6,
                    num_workers=3) as batches:
    assert isinstance(batches._reader, grain_reader.GrainReader)
    got = list(batches)
  indices = np.concatenate([b["index"] for b in got])
  np.testing.assert_array_equal(np.sort(indices[:8]), np.arange(8))
  for step, batch in enumerate(got):
    expected = limited.get_batch(data.train_batch_indices(0, step, 8, 4))
    np.testing.assert_array_equal(batch["image"], expected["image"])


def test_tfds_variable_size_images(tmp_path):
  _prepare("selfkd_tiny_variable", str(tmp_path))
  with pytest.raises(data.DataError, match="variable-size"):
    data.load_splits("selfkd_tiny_variable", data_dir=str(tmp_path))
