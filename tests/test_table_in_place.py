"""Per-example tables are updated in place: a compiled step holds no copy of its donated table.

Read from XLA's own memory analysis of the compiled step, not from the clock: the temporaries
a step allocates must stay far below one table (0.8-8 MB; a batch needs 0.1-0.4 MB), on one
device and on each of four, in float32 and bfloat16. Without the write depending on the read
(`scatter_rows(after=)`), XLA keeps a full copy of the table for the read (the temporary equals
the table); a bfloat16 table kept as bfloat16 rather than its bits is widened to float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfkd_jax import methods
from selfkd_jax.methods.lsskd import ROTATIONS

N, C, B = 20_000, 100, 64


def _temp_and_table_bytes(method, outputs, batch, num_devices):
  """(temporary bytes of the compiled, donated step per device, table bytes per device)."""
  state = methods.pad_tables(method.init(jax.random.PRNGKey(0)), num_devices)

  def step(state, outputs, batch, axis_name=None):
    loss, state, _ = method.update(state, outputs, batch, step=jnp.int32(3), axis_name=axis_name)
    return jnp.mean(loss), state

  if num_devices == 1:
    compiled = jax.jit(step, donate_argnums=0).lower(state, outputs, batch).compile()
  else:
    mesh = jax.make_mesh((num_devices,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    state = methods.shard_state(state, mesh)
    specs = methods.partition_specs(state)
    body = jax.shard_map(lambda s, o, b: step(s, o, b, "data"), mesh=mesh,
                         in_specs=(specs, P("data"), P("data")), out_specs=(P(), specs),
                         check_vma=False)
    compiled = jax.jit(body, donate_argnums=0).lower(state, outputs, batch).compile()
  return (compiled.memory_analysis().temp_size_in_bytes,
          methods.table_bytes(state, num_devices))


def _pskd_inputs(dtype):
  method = methods.pskd(N, C, 10, steps_per_epoch=100, storage_dtype=dtype)
  rng = np.random.default_rng(0)
  outputs = {"logits": jnp.asarray(rng.normal(size=(B, C)), jnp.float32)}
  batch = {"label": jnp.asarray(rng.integers(0, C, B), jnp.int32),
           "index": jnp.asarray(rng.permutation(N)[:B], jnp.int32)}
  return method, outputs, batch


def _lsskd_inputs(dtype):
  heads, joint, width = 2, ROTATIONS * 10, 8
  method = methods.lsskd(N // ROTATIONS, 10, 10, num_heads=heads, steps_per_epoch=100,
                         storage_dtype=dtype)
  rng = np.random.default_rng(0)
  rows = ROTATIONS * B
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  outputs = {"logits": normal(rows, 10), "features": normal(rows, width),
             "exit_logits": tuple(normal(rows, joint) for _ in range(heads)),
             "exit_features": tuple(normal(rows, width) for _ in range(heads))}
  batch = {"label": jnp.asarray(rng.integers(0, 10, B), jnp.int32),
           "index": jnp.asarray(rng.permutation(N // ROTATIONS)[:B], jnp.int32)}
  return method, outputs, batch


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_devices", [1, 4])
@pytest.mark.parametrize("name", ["pskd", "lsskd"])
def test_the_step_holds_no_copy_of_the_table(name, num_devices, dtype):
  inputs = _pskd_inputs(dtype) if name == "pskd" else _lsskd_inputs(dtype)
  temp, table = _temp_and_table_bytes(*inputs, num_devices)
  assert table >= 2e6 / num_devices  # the tables are large enough for a copy to show
  assert temp < table / 4, (temp, table)  # a copy would be >= table


def test_without_the_read_dependency_the_table_is_copied():
  """The measurement can fail: a step whose write ignores the read copies the whole table."""
  table0 = methods.create_table(N, (C,))

  def step(table, logits, indices):
    past = methods.gather_rows(table, indices)
    loss = -jnp.sum(past * jax.nn.log_softmax(logits))
    return loss, methods.scatter_rows(table, indices, jax.nn.softmax(logits))

  logits, indices = jnp.zeros((B, C)), jnp.arange(B)
  compiled = jax.jit(step, donate_argnums=0).lower(table0, logits, indices).compile()
  assert compiled.memory_analysis().temp_size_in_bytes >= table0.rows.nbytes


def test_the_rows_written_do_not_depend_on_the_ordering():
  table0 = methods.create_table(10, (3,))
  indices = jnp.array([7, 2, 11])  # 11: past the end, dropped
  values = jnp.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
  past = methods.gather_rows(table0, indices[:2])
  ordered = methods.scatter_rows(table0, indices, values, after=past)
  plain = methods.scatter_rows(table0, indices, values)
  np.testing.assert_array_equal(ordered.rows, plain.rows)
  np.testing.assert_array_equal(ordered.rows[7], np.float32([0.2, 0.3, 0.5]))
  assert float(jnp.sum(ordered.rows)) == 2.0
  # A NaN in what was read still leaves the written values exact.
  nan_past = jnp.full((2, 3), jnp.nan)
  np.testing.assert_array_equal(
      methods.scatter_rows(table0, indices, values, after=nan_past).rows, plain.rows)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="describes XLA's CPU backend")
def test_a_bfloat16_table_kept_as_bfloat16_is_copied_on_cpu():
  """Why bfloat16 tables store their bits: XLA's CPU backend has no 16-bit float scatter and
  widens a bfloat16 table to float32 around the write (two tables of temporaries)."""
  table0 = methods.PerExampleTable(jnp.zeros((N, C), jnp.bfloat16))  # values as storage
  assert methods.create_table(N, (C,), jnp.bfloat16).rows.dtype == jnp.uint16

  def step(table, logits, indices):
    past = methods.gather_rows(table, indices)
    loss = -jnp.sum(past * jax.nn.log_softmax(logits))
    return loss, methods.scatter_rows(table, indices, jax.nn.softmax(logits), after=past)

  logits, indices = jnp.zeros((B, C)), jnp.arange(B)
  compiled = jax.jit(step, donate_argnums=0).lower(table0, logits, indices).compile()
  assert compiled.memory_analysis().temp_size_in_bytes >= table0.rows.nbytes
