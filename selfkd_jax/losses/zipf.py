"""Zipf's label smoothing: rank-based non-target targets, from dense (per-position) votes
(`zipf_targets`) or from the sample's own logits (`zipf_logit_targets`), and the KL term."""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def _vote_ranks(votes: jax.Array) -> jax.Array:
  """`1 + #classes with strictly more votes` (ties share the minimum rank).

  Equals scipy's `rankdata(-votes, method='min')`, for integer vote counts and for any
  real scores (logits) alike. A sort plus a binary search per class is O(C log C) per
  example; the pairwise comparison would need a `[..., C, C]` array, too big for
  ImageNet-sized C and large batches.
  """
  num_classes = votes.shape[-1]
  flat_votes = votes.reshape(-1, num_classes)
  flat_sorted = jnp.sort(flat_votes, axis=-1)
  # Number of classes with at most v votes; the rest have strictly more.
  at_most = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side='right'))(flat_sorted, flat_votes)
  return (1 + num_classes - at_most).reshape(votes.shape)


def _zipf_from_scores(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Ranks `scores` over all C classes, weights 1/rank, drops the label, normalises.

  Shared by the dense and the logit variant, which differ only in what they rank.
  """
  num_classes = scores.shape[-1]
  ranks = _vote_ranks(scores)
  weights = jnp.where(_common.target_mask(labels, num_classes), 0.0, 1.0 / ranks)
  weights = weights.astype(jnp.float32)
  targets = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(targets)


def zipf_targets(
    dense_logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
  r"""Zipf's-law non-target distribution from dense per-position votes.

  Each of the `P` positions votes for its argmax class (on an exact tie, the lowest class
  id, as `jnp.argmax`). With `v_k` the vote count of class `k`, counted over all `C`
  classes (the label included):

  .. math::
    r_k = 1 + \#\{j : v_j > v_k\}, \qquad w_k = 1 / r_k, \qquad
    P_k = \frac{w_k \,[k \ne y]}{\sum_{j \ne y} w_j},

  so ties share the minimum rank, the label column is exactly 0 and the other `C − 1`
  columns sum to 1. Computed on device (the official code ranks on the host with scipy).
  This is the dense (voting) variant; `zipf_logit_targets` is `dense=False`, which ranks
  the sample's own logits instead of vote counts.

  The output is stop-gradient (it is a target; argmax has no gradient anyway).

  Args:
    dense_logits: `[..., P, C]` classifier logits at every spatial position.
    labels: `[...]` integer class ids.

  Returns:
    `[..., C]` float32 target rows with a zero label column. Use with `zipf_loss`.

  References:
    Liang et al., Efficient One Pass Self-distillation with Zipf's Label Smoothing,
    arXiv 2207.12980; code megvii-research/zipfls (`pytorch_zipfls/losses.py`).
  """
  dense_logits = _common.to_float(dense_logits)
  labels = jnp.asarray(labels)
  num_classes = dense_logits.shape[-1]
  if dense_logits.shape[:-2] != labels.shape:
    raise ValueError(
        f'dense_logits {dense_logits.shape} must be [..., P, C] with [...] = labels.shape '
        f'{labels.shape}.')
  winners = jnp.argmax(dense_logits, axis=-1)  # [..., P]
  votes = jnp.sum(jax.nn.one_hot(winners, num_classes, dtype=jnp.int32), axis=-2)
  return _zipf_from_scores(votes, labels)


def zipf_logit_targets(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike) -> jax.Array:
  r"""Zipf's-law non-target distribution ranked by the sample's own logits (`dense=False`).

  The same construction as `zipf_targets`, with the logits `z` in place of the vote
  counts: over all `C` classes (the label included),

  .. math::
    r_k = 1 + \#\{j : z_j > z_k\}, \qquad w_k = 1 / r_k, \qquad
    P_k = \frac{w_k \,[k \ne y]}{\sum_{j \ne y} w_j},

  so equal logits share the minimum rank (scipy's `rankdata(-z, method='min')`, as in
  the official code's non-dense path, which ranks the detached final logits). The label
  still takes part in the ranking: if it has the largest logit the other classes start
  at rank 2, otherwise the first one of them has rank 1.

  The output is stop-gradient (ranks are piecewise constant; the target is fixed).

  Args:
    logits: `[..., C]` logits of the sample (float32 or bfloat16; ranked in float32).
    labels: `[...]` integer class ids.

  Returns:
    `[..., C]` float32 target rows with a zero label column. Use with `zipf_loss`.

  References:
    Liang et al., Efficient One Pass Self-distillation with Zipf's Label Smoothing,
    arXiv 2207.12980; code megvii-research/zipfls (`pytorch_zipfls/losses.py`, `gen_pdf`).
  """
  logits = _common.to_float(logits)
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
        f'logits {logits.shape} must be [..., C] with [...] = labels.shape {labels.shape}.')
  return _zipf_from_scores(logits, labels)


def zipf_loss(
    logits: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""KL from the Zipf targets to the student's non-target distribution, per example.

  .. math::
    L = \textstyle\sum_{k \ne y} P_k \big(\log P_k - \log \hat{p}_k\big), \qquad
    \hat{p} = \mathrm{softmax}(z_{k \ne y}),

  with `0 · log 0 = 0`. The label class is removed from the softmax exactly (a `where` to
  `-inf`, not `z − 1000·mask`, so it is exact in bf16 and for any logit size), and the
  label column of `targets` is ignored. This is the distillation term only; the method adds
  `CE + λ·L` (λ = 0.1 CIFAR-100, 1.0 Tiny-ImageNet).

  Gradients flow into `logits` and, like `soft_cross_entropy`, into `targets`; the output of
  `zipf_targets` is already stop-gradient.

  Args:
    logits: `[..., C]` student logits.
    targets: `[..., C]` non-target distributions (e.g. from `zipf_targets`).
    labels: `[...]` integer class ids.

  Returns:
    `[...]` float32 losses.

  References:
    Liang et al., Efficient One Pass Self-distillation with Zipf's Label Smoothing,
    arXiv 2207.12980.
  """
  logits = _common.to_float(logits)
  labels = _common.class_ids(labels)
  mask = _common.target_mask(labels, logits.shape[-1])
  log_q, _ = _common.masked_log_softmax(logits, mask)
  targets = jnp.where(mask, 0.0, _common.to_float(targets))
  return (_common.kl_divergence(targets, _common.safe_log(targets), log_q)
          + _common.nan_unless_class(labels, logits.shape[-1]))
