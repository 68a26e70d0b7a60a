"""Parameters a method owns and trains itself (RAS-KD's head, AEKT's head, BYOT/LSSKD exits)."""

from __future__ import annotations

from typing import Any

import optax
from jax import lax

from selfkd_jax.methods.base import OwnedParams


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


def owned_exits(optimizer: optax.GradientTransformation) -> OwnedParams:
  """`OwnedParams` over a state with `exit_params` and `exit_opt_state` fields (BYOT, LSSKD)."""

  def apply_gradients(state, grads):
    params, opt_state = owned_params_step(optimizer, state.exit_params, state.exit_opt_state,
                                          grads)
    return state._replace(exit_params=params, exit_opt_state=opt_state)

  return OwnedParams(get=lambda state: state.exit_params,
                     put=lambda state, params: state._replace(exit_params=params),
                     apply_gradients=apply_gradients)
