"""Classification losses and the fixed (data-independent) target distributions.

All functions are per example: they sum over the class (last) axis and never reduce over
the batch, accept any leading batch shape `[...]`, accept float32 or bfloat16 inputs, compute
in float32 and return float32. Labels are integer class ids in `[0, C)`; an id outside that
range gives a NaN loss (or NaN target row), never a finite loss for another class.
"""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
  r"""Softmax cross entropy with integer labels, per example.

  .. math::
    L = -\log \mathrm{softmax}(z)_y = \log \textstyle\sum_k e^{z_k} - z_y .

  Args:
    logits: `[..., C]` unnormalised log-probabilities (float32 or bfloat16).
    labels: `[...]` integer class ids in `[0, C)`. Out-of-range ids give NaN.

  Returns:
    `[...]` float32 losses (no reduction over the batch).

  References:
    Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 1503.02531
    (the CE term every distillation loss here is combined with).
  """
  logits = _common.to_float(logits)
  labels = _common.class_ids(labels)
  _common.check_label_shape(labels, logits, 'logits')
  # Only the label column needs the normaliser subtracted (as in optax).
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return (jax.nn.logsumexp(logits, axis=-1) - label_logits
          + _common.nan_unless_class(labels, logits.shape[-1]))


def soft_cross_entropy(
    logits: jax.typing.ArrayLike, targets: jax.typing.ArrayLike) -> jax.Array:
  r"""Cross entropy against a target distribution, per example.

  .. math::
    L = -\textstyle\sum_k t_k \log \mathrm{softmax}(z)_k .

  This is a plain primitive: gradients DO flow into `targets`. Callers whose targets are
  built from the model (PS-KD, RAS-KD, ...) stop the gradient when building them.

  Args:
    logits: `[..., C]` unnormalised log-probabilities.
    targets: `[..., C]` target distributions (rows summing to 1), broadcastable to `logits`
      (a float array; integer class ids go to `cross_entropy`).

  Returns:
    `[...]` float32 losses.

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision,
    arXiv 1512.00567 (label smoothing, the first use with soft targets).
  """
  log_probs = jax.nn.log_softmax(_common.to_float(logits), axis=-1)
  targets = _common.check_targets(targets, log_probs.shape)
  return -jnp.sum(targets * log_probs, axis=-1)


def target_kl(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
  r"""KL divergence from fixed target distributions to the tempered student, per example.

  .. math::
    L = \mathrm{KL}\big(t \,\|\, \mathrm{softmax}(z / \tau)\big)
      = \textstyle\sum_k t_k (\log t_k - \log \mathrm{softmax}(z/\tau)_k),

  with `0 · log 0 = 0`. Unlike `distillation_kl` the teacher is given as probabilities (a
  virtual teacher such as the uniform or corrected-uniform distribution) and is not
  re-tempered, and there is no `τ²` factor: methods that want one multiply it in. It differs
  from `soft_cross_entropy(z/τ, t)` by the constant entropy of `t`, so its gradient is the same
  but its value is 0 at the optimum. The gradient into `targets` is stopped.

  Args:
    logits: `[..., C]` student logits.
    targets: `[..., C]` target distributions (rows summing to 1), broadcastable to `logits`.
    temperature: `τ > 0` applied to the student only.

  Returns:
    `[...]` float32 losses.
  """
  temperature = _common.to_float(temperature)
  log_q = jax.nn.log_softmax(_common.to_float(logits) / temperature, axis=-1)
  targets = jnp.broadcast_to(jax.lax.stop_gradient(_common.to_float(targets)), log_q.shape)
  return _common.kl_divergence(targets, _common.safe_log(targets), log_q)


def distillation_kl(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Hinton's temperature-scaled distillation term, per example.

  .. math::
    L = \tau^2 \cdot \mathrm{KL}\big(\mathrm{softmax}(t/\tau) \,\|\, \mathrm{softmax}(s/\tau)\big)
      = \tau^2 \textstyle\sum_k p^t_k (\log p^t_k - \log p^s_k),

  with `0 · log 0 = 0`. The `τ²` factor keeps the gradient magnitude independent of `τ`.

  The gradient into `teacher_logits` is stopped (`sg`): the teacher is a target.

  Args:
    student_logits: `[..., C]` student logits `s` (receives the gradient).
    teacher_logits: `[..., C]` teacher logits `t` (stop-gradient).
    temperature: `τ > 0`, a Python float or a (possibly traced) scalar.

  Returns:
    `[...]` float32 losses.

  References:
    Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 1503.02531.
  """
  temperature = _common.to_float(temperature)
  student = _common.to_float(student_logits) / temperature
  teacher = jax.lax.stop_gradient(_common.to_float(teacher_logits)) / temperature
  # log_softmax of finite logits is finite, so p·(log p − log q) is 0 when p underflows.
  log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
  log_p_student = jax.nn.log_softmax(student, axis=-1)
  kl = _common.kl_divergence(jnp.exp(log_p_teacher), log_p_teacher, log_p_student)
  return temperature**2 * kl


def smooth_labels(
    labels: jax.typing.ArrayLike,
    num_classes: int,
    epsilon: jax.typing.ArrayLike,
    *,
    exclude_target: bool = False,
) -> jax.Array:
  r"""Label-smoothing target rows.

  Default (optax convention, Szegedy et al.):

  .. math::
    q = (1-\epsilon)\, e_y + \epsilon / C,

  i.e. `1 − ε + ε/C` on the label and `ε/C` elsewhere. With `exclude_target=True` (the
  convention of the Tf-KD and Zipf repositories) the smoothing mass goes to the other
  classes only: `q_y = 1 − ε`, `q_k = ε/(C−1)` for `k ≠ y`. Rows sum to 1 in both cases.
  docs/METHODS.md lists `ε = 0.1` as the usual value; it is required here.

  Args:
    labels: `[...]` integer class ids.
    num_classes: `C`, a static Python int (`C ≥ 2` for `exclude_target=True`).
    epsilon: smoothing mass `ε`, a Python float or (possibly traced) scalar.
    exclude_target: put no smoothing mass on the label column.

  Returns:
    `[..., C]` float32 target rows (constants: no gradient flows to `labels`).

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision,
    arXiv 1512.00567.
    Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization
    (Tf-KD), arXiv 1909.11723.
  """
  labels = _common.class_ids(labels)
  epsilon = _common.to_float(epsilon)
  onehot = _common.target_mask(labels, num_classes).astype(epsilon.dtype)
  invalid = _common.nan_unless_class(labels, num_classes)[..., None]
  if exclude_target:
    return (1.0 - epsilon) * onehot + epsilon / (num_classes - 1) * (1.0 - onehot) + invalid
  return (1.0 - epsilon) * onehot + epsilon / num_classes + invalid


def corrected_uniform(
    labels: jax.typing.ArrayLike, num_classes: int, beta: jax.typing.ArrayLike) -> jax.Array:
  r"""The "teacher correction" (TC) of a uniform virtual teacher.

  .. math::
    u'_y = \beta, \qquad u'_k = (1-\beta)/(C-1) \ \ (k \ne y).

  `β = 1/C` gives the uniform distribution back. The (reconstructed) default given in
  docs/METHODS.md is `β = 0.5`; it is required here.

  Args:
    labels: `[...]` integer class ids.
    num_classes: `C ≥ 2`, a static Python int.
    beta: probability `β` of the label class, a Python float or (possibly traced) scalar.

  Returns:
    `[..., C]` float32 target rows.

  References:
    Extending Label Smoothing Regularization with Self-Knowledge Distillation (LsrKD/MrKD),
    arXiv 2009.05226. Reconstruction: the formula is our reading of the abstract.
  """
  labels = _common.class_ids(labels)
  beta = _common.to_float(beta)
  onehot = _common.target_mask(labels, num_classes).astype(beta.dtype)
  return (beta * onehot + (1.0 - beta) / (num_classes - 1) * (1.0 - onehot)
          + _common.nan_unless_class(labels, num_classes)[..., None])
