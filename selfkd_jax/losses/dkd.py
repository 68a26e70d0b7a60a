"""DKD: decoupled knowledge distillation (target-class and non-target-class terms)."""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def _binary_log_probs(scaled_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[log p_y, log(1 − p_y)]` of `softmax(scaled_logits)`, both from log-sum-exps.

  `log(1 − p_y)` is computed as `logsumexp(z_{k≠y}) − logsumexp(z)` instead of
  `log(1 − p_y)` from probabilities, which would be `log 0 = -inf` once `p_y` rounds to 1.
  """
  log_normalizer = jax.nn.logsumexp(scaled_logits, axis=-1)
  label_logit = jnp.sum(jnp.where(mask, scaled_logits, 0.0), axis=-1)
  non_target_lse = jax.nn.logsumexp(jnp.where(mask, -jnp.inf, scaled_logits), axis=-1)
  log_b = jnp.stack([label_logit - log_normalizer, non_target_lse - log_normalizer], axis=-1)
  return log_b, jnp.exp(log_b)


def dkd_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike = 1.0,
    beta: jax.typing.ArrayLike = 8.0,
    temperature: jax.typing.ArrayLike = 4.0,
) -> jax.Array:
  r"""Decoupled knowledge distillation, per example: `α·TCKD + β·NCKD`.

  With `p = softmax(z/T)` for the student (`s`) and the teacher (`t`):

  .. math::
    b = [p_y,\ 1 - p_y], \qquad
    \mathrm{TCKD} = T^2 \,\mathrm{KL}(b^t \,\|\, b^s),

    \hat{p} = \mathrm{softmax}(z_{k \ne y}/T), \qquad
    \mathrm{NCKD} = T^2 \,\mathrm{KL}(\hat{p}^t \,\|\, \hat{p}^s),

  with `0 · log 0 = 0`. The label class is removed from `p̂` exactly (a `where` to `-inf`
  instead of the official `z/T − 1000·mask`, which is only safe in fp32), so `p̂_y = 0`
  exactly in bf16 and whatever the target logit. `log(1 − p_y)` comes from log-sum-exps,
  so it stays finite when `p_y` rounds to 1.

  Faithful to megvii-research/mdistiller `dkd_loss` (the official code averages over the
  batch; here nothing is reduced). Not included: the CE term and the warm-up factor
  `min(e/warmup, 1)`; the method applies them. The gradient into `teacher_logits` is stopped.

  Args:
    student_logits: `[..., C]` student logits (receive the gradient).
    teacher_logits: `[..., C]` teacher logits (stop-gradient).
    labels: `[...]` integer class ids.
    alpha: TCKD weight; default 1.0 (mdistiller CIFAR).
    beta: NCKD weight; default 8.0 (mdistiller CIFAR-100).
    temperature: `T`; default 4.0. All three may be traced scalars.

  Returns:
    `[...]` float32 losses.

  References:
    Zhao et al., Decoupled Knowledge Distillation, arXiv 2203.08679; code
    megvii-research/mdistiller (`mdistiller/distillers/DKD.py`).
  """
  temperature = _common.to_float(temperature)
  student = _common.to_float(student_logits) / temperature
  teacher = jax.lax.stop_gradient(_common.to_float(teacher_logits)) / temperature
  labels = _common.class_ids(labels)
  mask = _common.target_mask(labels, student.shape[-1])

  log_b_student, _ = _binary_log_probs(student, mask)
  log_b_teacher, b_teacher = _binary_log_probs(teacher, mask)
  tckd = _common.kl_divergence(b_teacher, log_b_teacher, log_b_student)

  log_q_student, _ = _common.masked_log_softmax(student, mask)
  log_q_teacher, q_teacher = _common.masked_log_softmax(teacher, mask)
  nckd = _common.kl_divergence(q_teacher, log_q_teacher, log_q_student)

  scale = temperature**2
  return (_common.to_float(alpha) * scale * tckd + _common.to_float(beta) * scale * nckd
          + _common.nan_unless_class(labels, student.shape[-1]))
