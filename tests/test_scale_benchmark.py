"""benchmarks/scale.py's table fill on one device and on four: every row becomes a probability
vector, each different, and the table keeps its sharding. On one GPU under JAX 0.11.2 the table
came out of the runner unsplit (spec P(), not P('data')) and the fill refused it; the
'unsplit' case puts the table in that state on purpose."""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

from selfkd_jax.methods import PerExampleTable

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _load_scale():
  sys.path.insert(0, BENCHMARKS)  # scale.py imports step_time as a sibling
  try:
    spec = importlib.util.spec_from_file_location("scale", os.path.join(BENCHMARKS, "scale.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(BENCHMARKS)
  return module


@pytest.mark.parametrize("num_devices,unsplit,dtype", [
    (1, False, "float32"), (1, True, "float32"), (1, True, "bfloat16"), (4, False, "bfloat16")])
def test_fill_writes_a_distribution_into_every_row(num_devices, unsplit, dtype):
  scale = _load_scale()
  num_examples, num_classes = 1001, 10  # 1001 rows: padded over 4 devices
  runner = scale.parallel.make_runner("shard_map", jax.devices()[:num_devices])
  case = scale.step_time.StepCase(
      "pskd", "float32", runner=runner, model_name="mlp", image_shape=scale.IMAGE_SHAPE,
      num_classes=num_classes, num_examples=num_examples, batch_size=32,
      augmentation=scale.Augmentation(crop_padding=0, flip=False, mean=(0.5,) * 3,
                                      std=(0.25,) * 3),
      seed=0, method_overrides={"storage_dtype": dtype})
  before = case.state.method_state
  if unsplit:
    mesh = jax.tree.leaves(before)[0].sharding.mesh
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    before = jax.tree.map(lambda x: jax.device_put(x, whole), before)
  table_before = _the_table(before)
  sharding = table_before.rows.sharding
  assert (sharding.spec == jax.sharding.PartitionSpec()) == unsplit

  filled = scale._filled(before)  # pylint: disable=protected-access

  table = _the_table(filled)
  assert table.rows.sharding == sharding and table.rows.dtype == table_before.rows.dtype
  values = np.asarray(table.values(), np.float64)[:num_examples]
  # bfloat16 keeps 8 bits of mantissa: each of 10 entries within 2^-8 of its float32 value.
  tolerance = 1e-5 if dtype == "float32" else num_classes * 2.0**-8
  np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=tolerance)
  assert (values > 0).all()
  # Every row its own random draw: no two of the first rows alike, across device boundaries.
  assert len({tuple(row) for row in np.round(values, 3)}) == num_examples


def _the_table(method_state) -> PerExampleTable:
  """The one per-example table in PS-KD's state."""
  is_table = lambda x: isinstance(x, PerExampleTable)
  (table,) = [x for x in jax.tree.leaves(method_state, is_leaf=is_table) if is_table(x)]
  return table
