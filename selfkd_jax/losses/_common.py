"""Private numerics shared by the loss modules.

Everything here works on the last (class) axis, keeps every leading axis, and is written so
that neither the value nor the gradient can become NaN when a class is masked out or a
probability is exactly zero.
"""
import jax
import jax.numpy as jnp

# Rows of all-zero vectors must not divide by zero when L2-normalised (same value as
# torch.nn.functional.normalize, which the reference implementations use).
NORM_EPS = 1e-12


def to_float(x: jax.typing.ArrayLike) -> jax.Array:
  """Upcasts to at least float32 (bf16/fp16 -> fp32, fp32 unchanged, ints -> fp32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows divided by `max(‖x‖₂, 1e-12)`; an all-zero row stays zero instead of NaN.

  The clamp is applied before the square root: `sqrt` has an infinite derivative at 0, and
  clamping after it would still give a NaN gradient for an all-zero row.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, NORM_EPS**2))


def class_ids(labels: jax.typing.ArrayLike) -> jax.Array:
  """`labels` as an array, refused (TypeError) unless it holds integer class ids."""
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'labels must be integer class ids, got dtype {labels.dtype}.')
  return labels


def check_label_shape(labels: jax.Array, rows: jax.Array, rows_name: str) -> None:
  """Refuses `labels` unless their shape is `rows`' without its class axis (one id per row):
  a `[B, 1]` column would otherwise broadcast against `[B, C]` rows."""
  if labels.shape != rows.shape[:-1]:
    raise ValueError(f'labels {labels.shape} must have the shape of {rows_name} {rows.shape} '
                     'without its class axis: one class id per example.')


def nan_unless_class(labels: jax.Array, num_classes: int) -> jax.Array:
  """`[...]` float32: 0 where a label is a class id in `[0, C)`, NaN where it is not.

  Added to a loss (or to target rows) so that a wrong label is a NaN loss, which a training
  loop notices, instead of a finite loss for some other target: inside a jitted step an
  out-of-range id cannot raise, and left alone it would quietly become something else (a
  gather wraps -1 around to class C-1, a one-hot of it is an all-zero row).
  """
  valid = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid, 0.0, jnp.nan).astype(jnp.float32)


def check_targets(targets: jax.typing.ArrayLike, logits_shape: tuple[int, ...]) -> jax.Array:
  """`targets` as float (>= float32), refused unless they are probability rows that broadcast
  to `logits_shape` without enlarging it.

  Integer class ids would otherwise broadcast along the class axis (`[B]` against `[B, C]`
  when B == C, e.g. batch 100 on CIFAR-100) into a finite, meaningless loss.
  """
  targets = jnp.asarray(targets)
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(f'targets must be probability rows [..., C] (float), got dtype '
                    f'{targets.dtype}; for integer class ids use cross_entropy.')
  try:
    broadcast = jnp.broadcast_shapes(targets.shape, logits_shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(logits_shape) or targets.shape[-1:] != tuple(logits_shape[-1:]):
    raise ValueError(f'targets {targets.shape} must be probability rows [..., C] that broadcast '
                     f'to the logits {tuple(logits_shape)}.')
  return to_float(targets)


def target_mask(labels: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
  """Boolean `[..., C]` mask, True at each example's label column."""
  labels = jnp.asarray(labels)
  return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Log-softmax over the classes where `mask` is False, renormalised over those only.

  The excluded classes are removed with `jnp.where(mask, -inf, z)` rather than the
  `z - 1000 * mask` trick: subtracting 1000 is not exact in bf16 (or for logits of that
  magnitude), while `where` removes the class exactly whatever its logit.

  Returns:
    `(log_probs, probs)`. `probs` is exactly 0 on masked classes. `log_probs` holds a dummy
    0 (not -inf) on masked classes so that `p * (log p - log q)` stays finite there and
    gradients never see `0 * inf`.
  """
  excluded = jnp.where(mask, -jnp.inf, logits)
  log_normalizer = jax.nn.logsumexp(excluded, axis=-1, keepdims=True)
  log_probs = jnp.where(mask, 0.0, logits - log_normalizer)
  probs = jnp.where(mask, 0.0, jnp.exp(log_probs))
  return log_probs, probs


def safe_log(p: jax.Array) -> jax.Array:
  """`log p` where `p > 0`, 0 elsewhere; the double `where` keeps gradients finite at 0."""
  positive = p > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), 0.0)


def kl_divergence(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """`Σ_k p_k (log p_k − log q_k)` over the last axis, with `0 · log 0 = 0`.

  The caller passes finite `log_p` and `log_q` wherever `p == 0` (see `masked_log_softmax`
  and `safe_log`), so those terms are exactly 0.
  """
  return jnp.sum(p * (log_p - log_q), axis=-1)


def check_per_example_shape(name: str, value: jax.Array, labels_shape: tuple[int, ...]):
  """Raises unless `value` broadcasts to the per-example shape without enlarging it."""
  try:
    broadcast = jnp.broadcast_shapes(value.shape, labels_shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(labels_shape):
    raise ValueError(
        f'{name} must be a scalar or broadcastable to the per-example shape {labels_shape} '
        f'(one value per example, no class axis); got shape {value.shape}.')
