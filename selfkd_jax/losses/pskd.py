"""PS-KD: progressive self-knowledge distillation targets."""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def pskd_alpha(
    epoch: jax.typing.ArrayLike,
    total_epochs: jax.typing.ArrayLike,
    alpha_T: jax.typing.ArrayLike,
) -> jax.Array:
  r"""PS-KD's linearly growing weight of the past predictions.

  .. math::
    \alpha_e = \alpha_T \cdot \min(e + 1, E) / E,

  with `e` the 0-indexed epoch and `E` the total number of epochs. This is the official
  code's schedule (`faithful`); the paper writes `α_T · t / T`. It reaches `α_T` at the last
  epoch `e = E − 1` and stays there: an epoch past the schedule (a longer run, an epoch counted
  from 1 by mistake) never gives more than `α_T`. docs/METHODS.md lists `α_T = 0.8` as the
  default.

  All arguments may be Python numbers or (traced) scalars; the function is jit-safe.

  Args:
    epoch: `e`, 0-indexed current epoch.
    total_epochs: `E`.
    alpha_T: final weight `α_T`.

  Returns:
    A float32 scalar (or the broadcast shape of the arguments).

  References:
    Kim et al., Self-Knowledge Distillation with Progressive Refinement of Targets,
    arXiv 2006.12000; code lgcnsai/PS-KD-Pytorch (`main.py`).
  """
  epoch = _common.to_float(epoch)
  total_epochs = _common.to_float(total_epochs)
  return _common.to_float(alpha_T) * jnp.minimum(epoch + 1.0, total_epochs) / total_epochs


def pskd_targets(
    labels: jax.typing.ArrayLike,
    past_probs: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike,
) -> jax.Array:
  r"""PS-KD soft targets: the one-hot label mixed with the model's past prediction.

  .. math::
    q = (1-\alpha)\, e_y + \alpha \cdot \mathrm{sg}(P),

  with `C = past_probs.shape[-1]`. The gradient into `past_probs` is stopped (`sg`): the past
  predictions are a target built from the model itself. Use with `soft_cross_entropy`.

  Args:
    labels: `[...]` integer class ids.
    past_probs: `[..., C]` past predicted probabilities `P[i]` of the same examples.
    alpha: `α`, a scalar (e.g. `pskd_alpha(...)`) or an array broadcastable to
      `labels.shape` (one weight per example); it is applied to the whole row.

  Returns:
    `[..., C]` float32 target rows.

  Raises:
    ValueError: if `alpha` does not broadcast to the per-example shape `labels.shape`.

  References:
    Kim et al., Self-Knowledge Distillation with Progressive Refinement of Targets,
    arXiv 2006.12000.
  """
  labels = _common.class_ids(labels)
  past_probs = jax.lax.stop_gradient(_common.to_float(past_probs))
  alpha = _common.to_float(alpha)
  _common.check_per_example_shape('alpha', alpha, labels.shape)
  alpha = alpha[..., None]
  _common.check_label_shape(labels, past_probs, 'past_probs')
  num_classes = past_probs.shape[-1]
  onehot = _common.target_mask(labels, num_classes).astype(past_probs.dtype)
  return ((1.0 - alpha) * onehot + alpha * past_probs
          + _common.nan_unless_class(labels, num_classes)[..., None])
