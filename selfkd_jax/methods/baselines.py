"""The baselines every comparison needs: cross-entropy and label smoothing."""

from __future__ import annotations

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, logits_and_labels, stateless_init


def cross_entropy() -> Method:
  """Plain cross-entropy, `L = -log softmax(z)_y`. Stateless."""

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name, hooks
    return losses.cross_entropy(*logits_and_labels("cross_entropy", outputs, batch)), state, {}

  return Method(stateless_init, update)


def label_smoothing(epsilon: float = 0.1, *, exclude_target: bool = False) -> Method:
  """Label smoothing, `L = -sum_k q_k log softmax(z)_k`. Stateless.

  Args:
    epsilon: smoothing mass, in [0, 1]. Default 0.1.
    exclude_target: `False` (optax convention): `q = (1-eps) e_y + eps/C`. `True` (the Tf-KD and
      Zipf repos): `1-eps` on the label and `eps/(C-1)` on every other class.

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016.
  """
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"label_smoothing: epsilon must be in [0, 1], got {epsilon}")

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name, hooks
    logits, labels = logits_and_labels("label_smoothing", outputs, batch)
    targets = losses.smooth_labels(labels, logits.shape[-1], epsilon,
                                   exclude_target=exclude_target)
    return losses.soft_cross_entropy(logits, targets), state, {}

  return Method(stateless_init, update)
