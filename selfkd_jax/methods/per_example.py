"""Per-example state (one row per training example), sharded by rows across devices.

PS-KD keeps the last prediction of every training example: an `N x C` table. Replicating it
on every device (as the official PyTorch code does on every rank) costs `N*C*bytes` per
device: 5.1 GB in fp32 for ImageNet. Here device `d` of `D` owns the contiguous rows
`[d*R, (d+1)*R)` with `R = ceil(N/D)`, so each holds `N*C*bytes/D`.

Inside a data-parallel step a device's batch can name rows owned by any device, so reads and
writes exchange rows with collectives over the named axis:

- read: every device sees all indices of the global batch (`all_gather`), contributes the rows
  it owns (zeros elsewhere), and `psum_scatter` hands each device the rows of its own examples.
  Each row is a sum of one value and zeros, hence exact in any dtype.
- write: every device sees all `(index, row)` pairs of the global batch (`all_gather`) and writes
  the rows it owns; the others are dropped by an out-of-range index.

With `axis_name=None` (a single device, a user's own loop) both are plain indexing.

bfloat16 tables are stored as their bit patterns (`uint16` rows) and read and written as
bfloat16: XLA's CPU backend has no 16-bit float scatter and widens a bfloat16 table to float32
around every write (a copy of twice the table per step), while a `uint16` scatter is done in
place. The bits are the same on every backend, so checkpoints move between CPU, GPU and TPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class PerExampleTable:
  """Rows indexed by dataset index. Trainers shard `rows` along axis 0 (see `partition_specs`).

  A pytree whose one leaf is `rows`; `dtype` and `num_examples` are static.

  Attributes:
    rows: `[N_padded, ...]` storage array; rows past the dataset size are padding, never read.
      For a bfloat16 table these are the values' bit patterns (`uint16`; see the module
      docstring); read them with `values()` or `gather_rows`.
    dtype: the dtype of the values (what `gather_rows` returns); `None`: `rows.dtype`.
    num_examples: the rows that belong to examples, `N` (`create_table` sets it; padding keeps
      it); `None`: unknown, every row. `set_index_checks` refuses indices from `N` on, so a
      1-based index cannot land in a padding row unnoticed.
  """
  rows: jax.Array
  dtype: Any = None
  num_examples: int | None = None

  def __post_init__(self):
    if self.dtype is not None:  # one hashable form, so equal tables have equal tree structures
      object.__setattr__(self, "dtype", np.dtype(self.dtype))

  @classmethod
  def from_values(cls, values: jax.Array, dtype: Any = None) -> "PerExampleTable":
    """A table holding `values` (`[N, ...]`) as `dtype` (default: theirs)."""
    dtype = np.dtype(jnp.asarray(values).dtype if dtype is None else dtype)
    return cls(_to_storage(values, dtype), dtype)

  @property
  def value_dtype(self) -> np.dtype:
    return np.dtype(self.rows.dtype if self.dtype is None else self.dtype)

  def values(self) -> jax.Array:
    """All rows as values of `value_dtype` (a new array: the whole table)."""
    return _from_storage(self.rows, self.value_dtype)

  def as_stored(self, values: jax.Array) -> jax.Array:
    """`values` (rows) cast to `value_dtype` and encoded as `rows` holds them, to write."""
    return _to_storage(values, self.value_dtype)

  def with_rows(self, rows: jax.Array) -> "PerExampleTable":
    """The same table (dtype) over other storage rows: padded, reshaped or restored."""
    return dataclasses.replace(self, rows=rows)


jax.tree_util.register_dataclass(PerExampleTable, data_fields=["rows"],
                                 meta_fields=["dtype", "num_examples"])


def _stored_dtype(dtype: Any) -> np.dtype:
  """The dtype a table of `dtype` values keeps its rows in: `uint16` for bfloat16, else itself."""
  dtype = np.dtype(dtype)
  return np.dtype(np.uint16) if dtype == jnp.bfloat16 else dtype


def _to_storage(values: jax.Array, dtype: np.dtype) -> jax.Array:
  """`values` cast to `dtype`, then as the table stores them."""
  values = jnp.asarray(values).astype(dtype)
  stored = _stored_dtype(dtype)
  return values if stored == dtype else lax.bitcast_convert_type(values, stored)


def _from_storage(rows: jax.Array, dtype: np.dtype) -> jax.Array:
  return rows if rows.dtype == dtype else lax.bitcast_convert_type(rows, dtype)


def create_table(num_examples: int, row_shape: tuple[int, ...], dtype: Any = jnp.float32,
                 fill_value: float = 0.0) -> PerExampleTable:
  """A table of `num_examples` rows of shape `row_shape`, filled with `fill_value`."""
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}")
  dtype = np.dtype(dtype)
  fill = _to_storage(jnp.asarray(fill_value), dtype)  # one scalar: no whole table of values
  return PerExampleTable(jnp.full((num_examples, *row_shape), fill, _stored_dtype(dtype)), dtype,
                         int(num_examples))


def _is_table(x: Any) -> bool:
  return isinstance(x, PerExampleTable)


def pad_tables(state: Any, num_shards: int) -> Any:
  """Pads every table in `state` to a row count divisible by `num_shards`."""

  def pad(x):
    if not _is_table(x):
      return x
    extra = -x.rows.shape[0] % num_shards
    widths = [(0, extra)] + [(0, 0)] * (x.rows.ndim - 1)
    return x.with_rows(jnp.pad(x.rows, widths))

  return jax.tree.map(pad, state, is_leaf=_is_table)


def partition_specs(state: Any, axis_name: str = "data") -> Any:
  """PartitionSpecs for `state`: tables sharded by rows on `axis_name`, everything else replicated."""

  def spec(x):
    if _is_table(x):
      return x.with_rows(PartitionSpec(axis_name))
    return PartitionSpec()

  return jax.tree.map(spec, state, is_leaf=_is_table)


def _owned_positions(table: PerExampleTable, indices: jax.Array, axis_name: str):
  """Global indices of the whole batch, mapped to this device's local row positions."""
  rows_per_device = table.rows.shape[0]
  all_indices = lax.all_gather(indices, axis_name, tiled=True)
  local = all_indices - lax.axis_index(axis_name) * rows_per_device
  owned = (local >= 0) & (local < rows_per_device)
  return local, owned


_index_checks = {"enabled": False}


def set_index_checks(enabled: bool = True) -> None:
  """Turns on (or off) a host-side check of every table read, for debugging a loop.

  An index outside the table cannot raise inside a jitted step: XLA clamps the read and drops
  the write, so a wrong `batch['index']` (1-based, or into another dataset) trains on the wrong
  row without a word. With the check on, `gather_rows` passes the indices to the host
  (`jax.debug.callback`) and the step fails with `IndexError: batch['index'] holds <i>, outside
  the table's rows 0..<n-1>` (inside a `JaxRuntimeError`). Costs a device-to-host copy of the
  indices per read. Takes effect when a step is next traced (re-jit after changing it).
  """
  _index_checks["enabled"] = bool(enabled)


def _raise_if_out_of_range(indices, num_rows):
  indices = np.asarray(indices)
  bad = indices[(indices < 0) | (indices >= num_rows)]
  if bad.size:
    raise IndexError(f"batch['index'] holds {int(bad[0])}, outside the table's rows "
                     f"0..{int(num_rows) - 1}; indices are 0-based positions in the training set")


def gather_rows(table: PerExampleTable, indices: jax.Array,
                axis_name: str | None = None) -> jax.Array:
  """Rows `table[indices]` for this device's examples, in the table's dtype.

  Args:
    table: the full table (`axis_name=None`) or this device's row shard.
    indices: dataset indices of this device's examples, `[b]`.
    axis_name: the mesh axis the table is sharded over, or `None`.
  """
  if _index_checks["enabled"]:
    # Sharded: every device checks the whole global batch, so all of them stop together
    # instead of one leaving the others waiting in the row exchange.
    checked = indices if axis_name is None else lax.all_gather(indices, axis_name, tiled=True)
    num_rows = table.num_examples
    if num_rows is None:  # every row, padding included: the shards' total
      num_rows = table.rows.shape[0] * (1 if axis_name is None else lax.psum(1, axis_name))
    jax.debug.callback(_raise_if_out_of_range, checked, num_rows)
  dtype = table.value_dtype
  if axis_name is None:
    return _from_storage(table.rows[indices], dtype)
  local, owned = _owned_positions(table, indices, axis_name)
  safe = jnp.clip(local, 0, table.rows.shape[0] - 1)
  mask = owned.reshape(owned.shape + (1,) * (table.rows.ndim - 1))
  # Summed as values, not bits: NCCL, for one, has no 16-bit integer type to reduce.
  contributions = jnp.where(mask, _from_storage(table.rows[safe], dtype), jnp.zeros((), dtype))
  return lax.psum_scatter(contributions, axis_name, scatter_dimension=0, tiled=True)


def _ordered_after(values: jax.Array, read: Any) -> jax.Array:
  """`values`, unchanged, but computed from `read` so that a write of them follows the read.

  XLA's copy insertion keeps a donated buffer in place only when its in-place update depends on
  every earlier read of it through data, and `lax.optimization_barrier` does not count (it is
  lowered to scheduling hints first, on CPU). So one element of the read goes into the values
  as an exact zero: `(x != x) * 0` is 0 for every x, NaN included, and XLA cannot fold it away
  since it does not know x is not NaN.
  """
  leaf = jax.tree.leaves(read)[0]
  first = jnp.reshape(leaf, (-1,))[0]
  zero = (first != first).astype(values.dtype) * jnp.zeros((), values.dtype)
  return values + zero


def scatter_rows(table: PerExampleTable, indices: jax.Array, values: jax.Array,
                 axis_name: str | None = None, *, after: Any = None) -> PerExampleTable:
  """Returns the table with `table[indices] = values` (cast to the table's dtype).

  Indices within one global batch must be distinct (true for an epoch-permutation sampler).
  Indices past the end of the table are dropped (used for padding rows).

  `after`: what this step read from the table (`gather_rows`' result), if anything. Pass it:
  the write then depends on the read, which lets XLA update a donated table in place. Without
  it XLA keeps the old rows for the read in a full copy of the table every step (measured: an
  ImageNet-size table made a step 10x slower). The rows written are the same either way.
  """
  if after is not None:
    values = _ordered_after(values, after)
  values = values.astype(table.value_dtype)
  if axis_name is None:
    target = indices
  else:
    local, owned = _owned_positions(table, indices, axis_name)
    values = lax.all_gather(values, axis_name, tiled=True)
    target = jnp.where(owned, local, table.rows.shape[0])  # not owned: past the end, dropped
  return table.with_rows(table.rows.at[target].set(table.as_stored(values), mode="drop"))


def table_bytes(state: Any, num_shards: int = 1) -> int:
  """Bytes of all per-example tables in `state` held by one of `num_shards` devices."""
  tables = [x for x in jax.tree.leaves(state, is_leaf=_is_table) if _is_table(x)]
  return sum(t.rows.size * t.rows.dtype.itemsize for t in tables) // num_shards


def first_visit_one_hot(past: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Past prediction rows `[B, C]` with never-written rows replaced by `onehot(labels)`.

  Tables start at zero and every write is a probability row (sum 1; bfloat16 storage keeps the
  sum within 1%), so a row summing to less than 1/2 has never been written.
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=past.dtype)
  return jnp.where(written_rows(past)[..., None], past, onehot)


def written_rows(past: jax.Array) -> jax.Array:
  """`[B]` bools: which of the rows read from a probability table have ever been written (see
  `first_visit_one_hot`)."""
  return jnp.sum(past, axis=-1) > 0.5
