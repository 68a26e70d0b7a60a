"""Weighted sums of methods."""

from __future__ import annotations

from typing import Sequence

from selfkd_jax.methods.base import Method, OwnedParams


def combine(weights: Sequence[float], *transforms: Method) -> Method:
  """`L = sum_k w_k L_k` over `transforms`; the state is the tuple of their states.

  Metrics keep their names; a name two transforms share gets the transform's position as a
  prefix (`'1/name'`) so nothing is overwritten. `refresh` calls every transform's refresh.

  Transforms with exits of their own (BYOT): `exit_logits` merges their exits (names prefixed
  with the position when more than one transform has exits), and `owned` collects their
  parameters, so a caller differentiating them (our trainer) steps each transform's exits on
  the gradient of the combined loss, i.e. scaled by that transform's weight. A plain `update`
  lets each transform step its exits on its own, unweighted loss. A transform that changes the
  model's inputs (`train_inputs`, LSSKD's rotations) cannot be combined: the others would get
  outputs for more rows than the batch has.

  Example: PS-KD targets plus a 0.5-weighted label-smoothing term:
      method = combine([1.0, 0.5], pskd(N, C, E), label_smoothing(0.1))
  """
  if len(weights) != len(transforms):
    raise ValueError(f"combine: {len(weights)} weights for {len(transforms)} transforms")
  if not transforms:
    raise ValueError("combine: needs at least one transform")
  for position, transform in enumerate(transforms):
    if transform.train_inputs is not None:
      raise ValueError(f"combine: transform {position} has train_inputs (it trains the model on "
                       "more views than the batch, as LSSKD); it cannot be combined")

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

  with_exits = [(p, t) for p, t in enumerate(transforms) if t.exit_logits is not None]

  def exit_logits(state, outputs):
    merged = {}
    for position, transform in with_exits:
      for name, logits in transform.exit_logits(state[position], outputs).items():
        merged[f"{position}/{name}" if len(with_exits) > 1 else name] = logits
    return merged

  has_refresh = any(t.refresh is not None for t in transforms)
  return Method(init, update, refresh if has_refresh else None,
                exit_logits=exit_logits if with_exits else None,
                owned=_combined_owned(transforms))


def _combined_owned(transforms: Sequence[Method]) -> OwnedParams | None:
  """The owned parameters of every transform that has some, as a tuple (None for the rest)."""
  if all(t.owned is None for t in transforms):
    return None

  def get(state):
    return tuple(None if t.owned is None else t.owned.get(s) for t, s in zip(transforms, state))

  def put(state, params):
    return tuple(s if t.owned is None else t.owned.put(s, p)
                 for t, s, p in zip(transforms, state, params))

  def apply_gradients(state, grads):
    return tuple(s if t.owned is None else t.owned.apply_gradients(s, g)
                 for t, s, g in zip(transforms, state, grads))

  return OwnedParams(get, put, apply_gradients)
