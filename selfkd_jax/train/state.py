"""The one pytree a run trains and checkpoints."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


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
