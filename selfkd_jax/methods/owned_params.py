"""Parameters a method owns and trains itself (RAS-KD's head, AEKT's head, BYOT/LSSKD exits)."""

from __future__ import annotations

from typing import Any

import optax
from jax import lax


def owned_params_step(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                      grads: Any, axis_name: str | None = None) -> tuple[Any, Any]:
  """One `optimizer` step of method-owned `params`; returns `(params, opt_state)`.

  `grads` is the gradient of this device's batch-mean loss. Under `axis_name` it is averaged
  over the devices first, which gives the gradient of the global-batch mean (every device holds
  an equal slice), so the replicated parameters stay identical on every device.
  """
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
