"""Weighted sums of methods."""

from __future__ import annotations

from typing import Sequence

from selfkd_jax.methods.base import Method


def combine(weights: Sequence[float], *transforms: Method) -> Method:
  """`L = sum_k w_k L_k` over `transforms`; the state is the tuple of their states.

  Metrics keep their names; a name two transforms share gets the transform's position as a
  prefix (`'1/name'`) so nothing is overwritten. `refresh` calls every transform's refresh.

  Every transform sees the same `outputs`, so a head one transform reads (BYOT's exits) is
  trained by that transform's weighted terms; LSSKD's rotated outputs have 4·B rows and cannot
  be shared with a transform that expects B.

  Example: PS-KD targets plus a 0.5-weighted label-smoothing term:
      method = combine([1.0, 0.5], pskd(N, C, E, steps_per_epoch=S), label_smoothing(0.1))
  """
  if len(weights) != len(transforms):
    raise ValueError(f"combine: {len(weights)} weights for {len(transforms)} transforms")
  if not transforms:
    raise ValueError("combine: needs at least one transform")

  def init(rng=None):
    return tuple(t.init(rng) for t in transforms)

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    total, new_states, metrics = 0.0, [], {}
    seen = set()
    for position, (weight, transform, sub_state) in enumerate(zip(weights, transforms, state)):
      loss, sub_state, sub_metrics = transform.update(
          sub_state, outputs, batch, step=step, axis_name=axis_name, hooks=hooks)
      total = total + weight * loss
      new_states.append(sub_state)
      for name, value in sub_metrics.items():
        metrics[f"{position}/{name}" if name in seen else name] = value
        seen.add(name)
    return total, tuple(new_states), metrics

  def refresh(state, outputs, batch, *, axis_name=None):
    return tuple(
        t.refresh(s, outputs, batch, axis_name=axis_name) if t.refresh is not None else s
        for t, s in zip(transforms, state))

  has_refresh = any(t.refresh is not None for t in transforms)
  return Method(init, update, refresh if has_refresh else None)
