"""A checkpoint written on one device count restores on any other, whatever the dataset size.

Tables are padded to a multiple of the device count, so the stored row count depends on it:
N = 9 examples are 9 rows on 1 or 3 devices, 10 on 2, 12 on 4. Restoring must keep every real
row exactly and lay the table out for the new count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfkd_jax import methods
from selfkd_jax.train import parallel
from selfkd_jax.train.checkpoint import Checkpointer
from selfkd_jax.train.state import TrainState

N, C = 9, 5


def _init_fn(num_devices):
  method = methods.pskd(N, C, 4, steps_per_epoch=1)
  tx = optax.sgd(0.1)

  def init():
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    table = methods.PerExampleTable(jnp.arange(N * C, dtype=jnp.float32).reshape(N, C) + 1)
    state = methods.PSKDState(table)
    return TrainState(step=jnp.asarray(7, jnp.int32), params=params, batch_stats={},
                      opt_state=tx.init(params),
                      method_state=methods.pad_tables(state, num_devices),
                      rng=jax.random.PRNGKey(3))

  del method
  return init


def _runner(num_devices):
  return parallel.make_runner("shard_map", jax.devices()[:num_devices])


@pytest.mark.parametrize("saved_on, resumed_on", [(3, 4), (4, 3), (2, 1), (4, 2), (1, 4)])
def test_tables_restore_on_another_device_count(tmp_path, saved_on, resumed_on):
  writer = _runner(saved_on)
  saved = writer.init_state(_init_fn(saved_on))
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(7, saved)

  reader = _runner(resumed_on)
  abstract = reader.abstract_state(_init_fn(resumed_on))
  state, step = checkpointer.restore(abstract, adapt=reader.table_rows_adapter(abstract))
  checkpointer.close()

  assert step == 7
  rows = state.method_state.past_predictions.rows
  want = abstract.method_state.past_predictions.rows
  assert rows.shape == want.shape and rows.sharding == want.sharding
  expected = np.asarray(saved.method_state.past_predictions.rows)[:N]
  np.testing.assert_array_equal(np.asarray(rows)[:N], expected)
  np.testing.assert_array_equal(np.asarray(rows)[N:], 0.0)  # padding, never read
  np.testing.assert_array_equal(state.params["w"], saved.params["w"])
  np.testing.assert_array_equal(state.rng, saved.rng)
  assert int(state.step) == 7


def test_a_different_model_still_fails_to_restore(tmp_path):
  """The adapter moves table rows only: a leaf of another shape is not bent to fit."""
  writer = _runner(2)
  checkpointer = Checkpointer(str(tmp_path), keep=1, log=lambda _: None)
  checkpointer.save(7, writer.init_state(_init_fn(2)))
  init = _init_fn(4)

  def other_model():
    state = init()
    return state.replace(params={"w": jnp.zeros((3, 3))})

  reader = _runner(4)
  abstract = reader.abstract_state(other_model)
  with pytest.raises(Exception, match="no usable checkpoint"):
    checkpointer.restore(abstract, adapt=reader.table_rows_adapter(abstract))
  checkpointer.close()


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 2), (4, 3)])
def test_bfloat16_tables_saved_as_values_restore_as_their_bits(tmp_path, saved_on, resumed_on):
  """Checkpoints from before bfloat16 tables were stored as bits hold bfloat16 values; they
  must come back bit for bit, not converted numerically (0.3 would become 0)."""
  values = (jnp.arange(N * C, dtype=jnp.float32).reshape(N, C) + 1) / 7  # not integers

  def init_fn(num_devices, as_bits):
    def init():
      table = (methods.PerExampleTable.from_values(values, jnp.bfloat16) if as_bits
               else methods.PerExampleTable(values.astype(jnp.bfloat16)))  # the old layout
      return TrainState(step=jnp.asarray(7, jnp.int32), params={}, batch_stats={},
                        opt_state={}, method_state=methods.pad_tables(table, num_devices),
                        rng=jax.random.PRNGKey(3))
    return init

  saved = _runner(saved_on).init_state(init_fn(saved_on, as_bits=False))
  assert saved.method_state.rows.dtype == jnp.bfloat16
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(7, saved)
  reader = _runner(resumed_on)
  abstract = reader.abstract_state(init_fn(resumed_on, as_bits=True))
  state, _ = checkpointer.restore(abstract, adapt=reader.table_rows_adapter(abstract))
  checkpointer.close()

  table = state.method_state
  assert table.rows.dtype == jnp.uint16 and table.value_dtype == jnp.bfloat16
  assert table.rows.sharding == abstract.method_state.rows.sharding
  np.testing.assert_array_equal(np.asarray(table.values()[:N], np.float32),
                                np.asarray(values.astype(jnp.bfloat16), np.float32))
