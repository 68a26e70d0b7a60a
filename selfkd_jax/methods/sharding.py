"""Data-parallel layouts of a method state: per-example tables split by rows, the rest replicated.

For a `shard_map` step over a 1-D mesh (`state_shardings`, `shard_state`) and for `pmap`
(`to_pmap_layout`, `from_pmap_layout`). Works on any pytree that holds method states (a whole
train state too): every `PerExampleTable` is split by rows over the devices, every other leaf is
replicated. Tables are padded to a row count the device count divides; padding rows are never
read, and writes to them are dropped.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from selfkd_jax.methods.per_example import _is_table, pad_tables, partition_specs


def state_shardings(state: Any, mesh: Mesh, axis_name: str = "data") -> Any:
  """`NamedSharding`s for `state` on `mesh`: tables by rows over `axis_name`, the rest replicated.

  Use them as `jax.jit(..., out_shardings=...)` of an init function, or with `jax.device_put`.
  The matching `shard_map` specs are `methods.partition_specs(state, axis_name)`.
  """
  specs = partition_specs(state, axis_name)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def shard_state(state: Any, mesh: Mesh, axis_name: str = "data") -> Any:
  """`state` padded for the mesh and placed on it: each device holds `N_padded / D` table rows."""
  state = pad_tables(state, mesh.shape[axis_name])
  return jax.device_put(state, state_shardings(state, mesh, axis_name))


def init_sharded(init: Callable[..., Any], mesh: Mesh, rng: jax.Array | None = None,
                 axis_name: str = "data") -> Any:
  """`init(rng)` built directly in its sharded layout: `shard_state(init(rng), mesh)` without
  ever holding a whole table on one device or the host (the way to build an ImageNet-size one).

  The tables are padded inside the jitted init, so any row count works on any device count
  (`jax.jit(init, out_shardings=state_shardings(...))` alone requires the row count to be
  divisible by the device count, which ImageNet's 1,281,167 is not).

  Args:
    init: a method's `init` (or any function of `rng` returning a state).
    mesh: the 1-D data-parallel mesh.
    rng: passed to `init`.
    axis_name: the mesh axis the tables are split over.
  """
  def padded_init(rng):
    return pad_tables(init(rng), mesh.shape[axis_name])

  shardings = state_shardings(jax.eval_shape(padded_init, rng), mesh, axis_name)
  return jax.jit(padded_init, out_shardings=shardings)(rng)


def to_pmap_layout(state: Any, num_devices: int) -> Any:
  """`state` as `jax.pmap` takes it: a leading device axis on every leaf.

  Tables are padded and reshaped `[N_padded, ...] -> [D, N_padded / D, ...]` (device d holds
  block d, the same rows a `shard_map` step gives it); other leaves are broadcast to `[D, ...]`.
  """
  state = pad_tables(state, num_devices)

  def convert(x):
    if _is_table(x):
      return x.with_rows(jnp.reshape(x.rows, (num_devices, -1) + x.rows.shape[1:]))
    return jnp.broadcast_to(x, (num_devices,) + jnp.shape(x))

  return jax.tree.map(convert, state, is_leaf=_is_table)


def from_pmap_layout(state: Any) -> Any:
  """The inverse of `to_pmap_layout` (tables keep their padding rows): device 0's copy of
  replicated leaves, the blocks of every table joined back into `[N_padded, ...]`."""

  def convert(x):
    if _is_table(x):
      return x.with_rows(jnp.reshape(x.rows, (-1,) + x.rows.shape[2:]))
    return x[0]

  return jax.tree.map(convert, state, is_leaf=_is_table)
