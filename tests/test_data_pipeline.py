"""Batch order by step, resume, host sharding, eval padding, background reading, device put."""
import gc
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from selfkd_jax import data


def _source(n=50, shape=(4, 3, 2)):
  rng = np.random.default_rng(0)
  return data.ArraySource(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                          rng.integers(0, 7, n))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _reader_threads():
  return [t for t in threading.enumerate() if t.name.startswith("selfkd-data")]


def test_steps_per_epoch_drops_remainder():
  assert data.steps_per_epoch(100, 32) == 3
  assert data.steps_per_epoch(96, 32) == 3
  with pytest.raises(data.DataError, match="larger than"):
    data.steps_per_epoch(10, 32)


def test_epoch_permutation_deterministic_and_fresh():
  a = data.epoch_permutation(3, 0, 1000)
  np.testing.assert_array_equal(a, data.epoch_permutation(3, 0, 1000))
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))
  assert not np.array_equal(a, data.epoch_permutation(3, 1, 1000))
  assert not np.array_equal(a, data.epoch_permutation(4, 0, 1000))
  a[:] = 0  # The caller's copy is its own: the cached permutation is unchanged.
  np.testing.assert_array_equal(np.sort(data.epoch_permutation(3, 0, 1000)), np.arange(1000))


def test_train_batch_indices_follow_permutation():
  n, batch = 103, 10  # 10 steps per epoch, 3 examples dropped each epoch.
  for epoch in range(3):
    permutation = data.epoch_permutation(7, epoch, n)
    steps = [data.train_batch_indices(7, epoch * 10 + s, n, batch) for s in range(10)]
    epoch_indices = np.concatenate(steps)
    np.testing.assert_array_equal(epoch_indices, permutation[:100])
    assert len(np.unique(epoch_indices)) == 100  # Every kept index exactly once.
  assert not np.array_equal(data.train_batch_indices(7, 0, n, batch),
                            data.train_batch_indices(7, 10, n, batch))


def test_train_batches_values_and_shapes():
  source = _source()
  with data.TrainBatches(source, seed=1, global_batch_size=8, start_step=0,
                         num_steps=9) as batches:
    assert len(batches) == 9
    got = list(batches)
  assert len(got) == 9
  for step, batch in enumerate(got):
    assert batch["image"].shape == (8, 4, 3, 2) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    _assert_batches_equal(batch, source.get_batch(data.train_batch_indices(1, step, 50, 8)))


def test_resume_matches_uninterrupted():
  source = _source()
  with data.TrainBatches(source, seed=5, global_batch_size=8, start_step=0, num_steps=25,
                         num_workers=3) as batches:
    full = list(batches)
  with data.TrainBatches(source, seed=5, global_batch_size=8, start_step=13,
                         num_steps=25) as batches:
    resumed = list(batches)
  assert len(resumed) == 12
  for a, b in zip(full[13:], resumed):
    _assert_batches_equal(a, b)


def test_two_processes_concatenate_to_global_batch():
  source = _source()
  kwargs = dict(seed=2, global_batch_size=8, start_step=3, num_steps=10)
  with data.TrainBatches(source, **kwargs) as batches:
    single = list(batches)
  hosts = []
  for process_index in range(2):
    with data.TrainBatches(source, process_index=process_index, process_count=2,
                           **kwargs) as batches:
      hosts.append(list(batches))
  for whole, first, second in zip(single, *hosts):
    assert first["image"].shape[0] == 4
    _assert_batches_equal(whole, {k: np.concatenate([first[k], second[k]]) for k in whole})
  with pytest.raises(data.DataError, match="divisible"):
    data.TrainBatches(source, process_count=3, **kwargs)


@pytest.mark.parametrize("process_count", [1, 4])
def test_eval_batches_cover_split_once(process_count):
  source = _source(n=23)
  seen, shapes = [], set()
  for process_index in range(process_count):
    with data.eval_batches(source, global_batch_size=8, process_index=process_index,
                           process_count=process_count) as batches:
      assert len(batches) == 3
      for batch in batches:
        shapes.add(batch["image"].shape)
        real = batch["mask"] == 1
        assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
        _assert_batches_equal({k: v[real] for k, v in batch.items() if k != "mask"},
                              source.get_batch(batch["index"][real]))
        assert not batch["image"][~real].any() and not batch["index"][~real].any()
        seen.append(batch["index"][real])
  assert shapes == {(8 // process_count, 4, 3, 2)}
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(23))
  assert sum(len(s) for s in seen) == 23  # No example twice.


def test_worker_exception_reraised_and_threads_stop():
  class Broken(data.ArraySource):
    calls = 0

    def get_batch(self, indices):
      Broken.calls += 1
      if Broken.calls == 3:
        raise RuntimeError("disk on fire")
      return super().get_batch(indices)

  good = _source()
  batches = data.TrainBatches(Broken(good.images, good.labels), seed=0, global_batch_size=8,
                              start_step=0, num_steps=20, num_workers=1)
  got = []
  with pytest.raises(RuntimeError, match="disk on fire"):
    for batch in batches:
      got.append(batch)
  assert len(got) == 2
  assert not _reader_threads()


def test_close_stops_threads_early():
  batches = data.TrainBatches(_source(), seed=0, global_batch_size=8, start_step=0,
                              num_steps=1000, num_workers=2)
  next(batches)
  assert _reader_threads()
  batches.close()
  assert not _reader_threads()
  with pytest.raises(StopIteration):
    next(batches)


def test_dropped_reader_stops_threads():
  batches = data.TrainBatches(_source(), seed=0, global_batch_size=8, start_step=0,
                              num_steps=1000)
  next(batches)
  assert _reader_threads()
  del batches
  gc.collect()
  assert not _reader_threads()


def test_prefetch_to_device_shards_batch_axis():
  assert jax.device_count() == 4
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  source = _source()
  batches = data.TrainBatches(source, seed=0, global_batch_size=8, start_step=0, num_steps=5)
  got = list(data.prefetch_to_device(batches, sharding, size=2))
  assert len(got) == 5
  assert not _reader_threads()  # Exhausting the prefetcher closed the reader.
  for step, batch in enumerate(got):
    expected = source.get_batch(data.train_batch_indices(0, step, 50, 8))
    for key, value in batch.items():
      assert isinstance(value, jax.Array)
      assert value.sharding.is_equivalent_to(sharding, value.ndim)
      np.testing.assert_array_equal(np.asarray(value), expected[key])
      # Device d holds rows 2d, 2d+1 of the global batch.
      for shard in value.addressable_shards:
        rows = shard.index[0]
        np.testing.assert_array_equal(np.asarray(shard.data), expected[key][rows])
        assert rows.stop - rows.start == 2


@pytest.mark.parametrize("start_step", [0, 7])
def test_grain_reader_yields_the_same_batches(start_step):
  source = _source()
  kwargs = dict(seed=3, global_batch_size=8, start_step=start_step, num_steps=20)
  with data.TrainBatches(source, reader="threads", **kwargs) as threads:
    expected = list(threads)
  with data.TrainBatches(source, reader="grain", num_workers=3, **kwargs) as grained:
    assert len(grained) == 20 - start_step
    got = list(grained)
  assert len(got) == len(expected) == 20 - start_step
  for a, b in zip(got, expected):
    _assert_batches_equal(a, b)
  padded = list(data.eval_batches(source, global_batch_size=16, reader="grain"))
  for a, b in zip(padded, data.eval_batches(source, global_batch_size=16, reader="threads")):
    _assert_batches_equal(a, b)
  assert len(padded) == 4 and padded[-1]["mask"].sum() == 2


def test_grain_reader_reraises_in_order_and_closes():
  class Broken(data.ArraySource):
    def get_batch(self, indices):
      if indices[0] == first_of_step_2:
        raise RuntimeError("disk on fire")
      return super().get_batch(indices)

  good = _source()
  first_of_step_2 = data.train_batch_indices(0, 2, 50, 8)[0]
  batches = data.TrainBatches(Broken(good.images, good.labels), seed=0, global_batch_size=8,
                              start_step=0, num_steps=20, reader="grain")
  got = []
  with pytest.raises(RuntimeError, match="disk on fire"):
    for batch in batches:
      got.append(batch)
  assert len(got) == 2
  with pytest.raises(StopIteration):
    next(batches)


def test_reader_auto_picks_grain_for_tfds_only():
  from selfkd_jax.data import grain_reader
  assert not grain_reader.uses_grain("auto", _source())
  assert grain_reader.uses_grain("grain", _source())
  with pytest.raises(ValueError, match="allowed: auto, threads, grain"):
    grain_reader.uses_grain("dali", _source())
