"""Running per-device step bodies over a 1-D device mesh: `shard_map` under `jit`, or `pmap`.

Both runners keep the train state in one *global layout* outside the step: replicated leaves
are whole arrays, per-example tables are `[N_padded, ...]` arrays whose rows are split evenly
over the devices (device d holds block d). Checkpoints are written in this layout, so a run can
switch between the two runners. Inside the step every device sees the same thing under both:
its batch slice, the replicated state and its block of table rows.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from selfkd_jax.methods import from_pmap_layout, partition_specs, to_pmap_layout
from selfkd_jax.train.state import TrainState

AXIS = "data"


def state_partition_specs(state: TrainState) -> TrainState:
  """PartitionSpecs for the train state: tables by rows on the data axis, the rest replicated."""
  replicated = PartitionSpec()
  return TrainState(step=replicated, params=replicated, batch_stats=replicated,
                    opt_state=replicated, method_state=partition_specs(state.method_state, AXIS),
                    rng=replicated)


def _expand_specs(specs, tree):
  """A full spec tree for `tree` from a prefix spec tree."""
  return jax.tree.map(lambda spec, subtree: jax.tree.map(lambda _: spec, subtree), specs, tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def _leaf_names(tree) -> dict[str, Any]:
  """`{dotted name: leaf}`, named as Orbax names a checkpoint's leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_dotted(path): leaf for path, leaf in leaves}


def _dotted(path) -> str:
  return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                  for k in path)


def _map_named(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(_dotted(path), leaf), tree)


def _fit_rows(rows: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
  """`rows` cut or zero-padded along axis 0 to `like`'s row count, laid out as `like`; bfloat16
  values become the bits `like` (a table's `uint16` storage) holds."""

  def fit(x):
    if x.dtype != like.dtype:
      x = jax.lax.bitcast_convert_type(x, like.dtype)
    kept = x[:min(x.shape[0], like.shape[0])]
    return jnp.pad(kept, [(0, like.shape[0] - kept.shape[0])] + [(0, 0)] * (x.ndim - 1))

  return jax.jit(fit, out_shardings=like.sharding)(rows)


class ShardMapRunner:
  """`jax.shard_map` over a 1-D mesh, under `jax.jit` (the default)."""

  name = "shard_map"

  def __init__(self, devices):
    self.devices = list(devices)
    self.num_devices = len(self.devices)
    self.mesh = jax.make_mesh((self.num_devices,), (AXIS,),
                              axis_types=(jax.sharding.AxisType.Auto,), devices=self.devices)
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))

  def shardings(self, abstract_state: TrainState):
    specs = _expand_specs(state_partition_specs(abstract_state), abstract_state)
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs)

  def init_state(self, init_fn: Callable[[], TrainState]) -> TrainState:
    """Builds the state directly in its sharded layout (no host copy of the tables)."""
    abstract = jax.eval_shape(init_fn)
    return jax.jit(init_fn, out_shardings=self.shardings(abstract))()

  def abstract_state(self, init_fn: Callable[[], TrainState]):
    """Shapes, dtypes and shardings of the global-layout state (for checkpoint restore)."""
    abstract = jax.eval_shape(init_fn)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.shardings(abstract))

  def table_rows_adapter(self, abstract_state):
    """A `Checkpointer.restore` adapter for checkpoints written on another device count, or
    with bfloat16 tables stored as values.

    Tables are padded to a multiple of the device count, so a checkpoint from another count
    can hold more or fewer rows than this run's tables. Those leaves are restored replicated
    (a transient whole table per device), cut or zero-padded to this run's row count (the rows
    past the dataset are padding, never read) and sharded by rows again. bfloat16 tables are
    stored as their bits (`uint16`, see `methods.per_example`); checkpoints written before that
    hold bfloat16 values, which are read as such and bitcast, never converted numerically.
    Every other leaf, and every table that matches, restores as usual.
    """
    named = _leaf_names(abstract_state)
    replicated = NamedSharding(self.mesh, PartitionSpec())

    def adapt(saved_leaves):
      def is_moved(name, leaf):
        saved = saved_leaves.get(name)
        if saved is None or leaf.sharding.spec != PartitionSpec(AXIS):
          return False
        as_values = saved.dtype == jnp.bfloat16 and leaf.dtype == jnp.uint16
        return ((saved.shape != leaf.shape or as_values) and saved.shape[1:] == leaf.shape[1:]
                and (saved.dtype == leaf.dtype or as_values))

      moved = {name for name, leaf in named.items() if is_moved(name, leaf)}
      if not moved:
        return abstract_state, None
      target = _map_named(
          lambda name, leaf: (jax.ShapeDtypeStruct(saved_leaves[name].shape,
                                                   saved_leaves[name].dtype, sharding=replicated)
                              if name in moved else leaf), abstract_state)

      def convert(state):
        return _map_named(lambda name, x: (_fit_rows(x, named[name]) if name in moved else x),
                          state)

      return target, convert

    return adapt

  def compile_train(self, body, abstract_state):
    """`body(state, batch, frozen) -> (state, metrics)`; `frozen` (a teacher's variables, or an
    empty dict) is replicated, read-only and never donated."""
    specs = state_partition_specs(abstract_state)
    # check_vma=False: gradients are averaged explicitly with pmean inside the body; with VMA
    # checking on, the transpose of a replicated parameter would already sum over devices.
    mapped = jax.shard_map(body, mesh=self.mesh,
                           in_specs=(specs, PartitionSpec(AXIS), PartitionSpec()),
                           out_specs=(specs, PartitionSpec()), check_vma=False)
    return jax.jit(mapped, donate_argnums=0)

  def compile_eval(self, body, abstract_state):
    specs = state_partition_specs(abstract_state)
    mapped = jax.shard_map(body, mesh=self.mesh, in_specs=(specs, PartitionSpec(AXIS)),
                           out_specs=PartitionSpec(AXIS), check_vma=False)
    return jax.jit(mapped)

  def compile_refresh(self, body, abstract_state):
    specs = state_partition_specs(abstract_state)
    mapped = jax.shard_map(body, mesh=self.mesh, in_specs=(specs, PartitionSpec(AXIS)),
                           out_specs=specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=0)

  def put_batch(self, host_batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in host_batch.items()}

  def put_frozen(self, tree):
    """Read-only variables (a teacher) as the train step takes them: replicated."""
    return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

  def to_global(self, state):
    return state

  def from_global(self, state):
    return state

  def metrics_to_host(self, metrics):
    """Replicated step metrics as host numbers (one device sync for the whole list)."""
    return jax.device_get(metrics)

  def fetch(self, tree) -> Any:
    """Brings a batch-sharded output back to the host, whole, on every process."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


class PmapRunner(ShardMapRunner):
  """`jax.pmap` with the same body and axis name (`config.parallel = 'pmap'`).

  pmap wants a leading device axis on every input: replicated leaves are broadcast to
  `[D, ...]`, table rows are reshaped to `[D, R, ...]`, batches to `[D, b/D, ...]`.
  """

  name = "pmap"

  def compile_train(self, body, abstract_state):
    del abstract_state
    return jax.pmap(body, axis_name=AXIS, devices=self.devices, donate_argnums=0)

  def compile_eval(self, body, abstract_state):
    del abstract_state
    return jax.pmap(body, axis_name=AXIS, devices=self.devices)

  def compile_refresh(self, body, abstract_state):
    del abstract_state
    return jax.pmap(body, axis_name=AXIS, devices=self.devices, donate_argnums=0)

  def put_batch(self, host_batch: dict) -> dict:
    local = jax.local_device_count() if jax.process_count() > 1 else self.num_devices
    return {k: np.reshape(v, (local, -1) + v.shape[1:]) for k, v in host_batch.items()}

  def to_global(self, state: TrainState) -> TrainState:
    """pmap layout -> global layout (for checkpoints and the loop)."""
    return from_pmap_layout(state)

  def from_global(self, state: TrainState) -> TrainState:
    # pmap (built on shard_map since JAX 0.8) takes inputs already split on the leading axis.
    return jax.device_put(to_pmap_layout(state, self.num_devices), self.batch_sharding)

  def _replicate(self, x):
    """A replicated leaf in pmap's layout: one copy per device on the leading axis."""
    return jax.device_put(jnp.broadcast_to(x, (self.num_devices,) + jnp.shape(x)),
                          self.batch_sharding)

  def put_frozen(self, tree):
    return jax.tree.map(self._replicate, tree)

  def metrics_to_host(self, metrics):
    return jax.tree.map(lambda x: x[0], jax.device_get(metrics))

  def fetch(self, tree) -> Any:
    host = jax.device_get(tree)
    return jax.tree.map(lambda x: np.reshape(x, (-1,) + x.shape[2:]), host)


RUNNERS = {"shard_map": ShardMapRunner, "pmap": PmapRunner}


def make_runner(mode: str, devices):
  return RUNNERS[mode](devices)


def prefetch(iterator: Iterator[dict], put: Callable[[dict], Any], size: int = 2):
  """Moves batches to the devices in a background thread, keeping `size` in flight."""
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def worker():
    try:
      for item in iterator:
        if stop.is_set():
          return
        buffer.put(put(item))
      buffer.put(done)
    except BaseException as error:  # handed to the consumer
      buffer.put(error)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
