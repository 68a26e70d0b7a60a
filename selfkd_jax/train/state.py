"""The one pytree a run trains and checkpoints."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from selfkd_jax.methods import pad_tables


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and nothing else (no functions, no config).

  Attributes:
    step: global step count; the data position is derived from it (epoch = step // steps).
    params: model parameters.
    batch_stats: BatchNorm running statistics (an empty dict for models without BatchNorm).
    opt_state: optimizer state.
    method_state: the method's state (past predictions, prototypes, snapshots, ...).
    rng: the run's base key; augmentation and dropout keys are folded from it by epoch/step and
      example index, so it never needs splitting.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array

  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def initial_state_fn(*, model, method, tx, image_shape, seed: int, num_devices: int):
  """A pure function building the initial global-layout state (to be jitted with shardings).

  Parameters and BatchNorm statistics come from `model.init` on one dummy image; the method's
  per-example tables are padded to a multiple of `num_devices` so their rows split evenly.
  """

  def init() -> TrainState:
    init_rng, method_rng, run_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      method_state=pad_tables(method.init(method_rng), num_devices),
                      rng=run_rng)

  return init
