"""ReffAKD: distillation from autoencoder-made class soft labels (a fixed pseudo-teacher)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, logits_and_labels, stateless_init

VARIANTS = ("faithful", "kldiv_mean")


def _check_soft_labels(soft_labels, name: str) -> np.ndarray:
  """The `[C, C]` rows as float32 numpy, or ValueError (one line) if they are no distributions."""
  rows = np.asarray(soft_labels, dtype=np.float32)
  if rows.ndim != 2 or rows.shape[0] != rows.shape[1] or rows.shape[0] < 2:
    raise ValueError(f"{name}: soft_labels must be a [C, C] matrix (C >= 2), got shape "
                     f"{rows.shape}; pass losses.reffakd_soft_labels(similarity)")
  if not np.all(np.isfinite(rows)) or np.any(rows < 0):
    raise ValueError(f"{name}: soft_labels must be finite and non-negative")
  row_sums = rows.sum(axis=1)
  if np.max(np.abs(row_sums - 1.0)) > 1e-3:
    raise ValueError(f"{name}: every row of soft_labels must sum to 1, got sums in "
                     f"[{row_sums.min():.4f}, {row_sums.max():.4f}]; pass "
                     "losses.reffakd_soft_labels(similarity), not the similarity itself")
  return rows


def soft_label_teacher(soft_labels, *, as_logits: bool = False) -> Callable[[jax.Array], jax.Array]:
  """A fixed pseudo-teacher: integer labels `[...]` → the label's soft-label row `[..., C]`.

  `teacher(y) = S_soft[y]` (ReffAKD's teacher, the same for every image of a class). Any
  logit-based KD loss can use it in place of a trained teacher's output.

  Args:
    soft_labels: `[C, C]` rows summing to 1 (`losses.reffakd_soft_labels(S)`).
    as_logits: return `log S_soft[y]` instead, logits whose softmax is the row, for losses
      that take teacher logits (`losses.distillation_kl`, `losses.dkd_loss`). Note that such a
      loss then tempers the teacher, `softmax(log S_soft[y] / τ)`, which the ReffAKD notebooks
      never do (their student alone is divided by `T`). Zero entries become a large negative
      finite number, so the logits stay finite.

  Returns:
    `teacher(labels) -> [..., C]` float32, jit-safe, no gradient (a constant).

  References:
    Doshi & Kim, ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
    arXiv 2404.09886.
  """
  rows = _check_soft_labels(soft_labels, "soft_label_teacher")
  if as_logits:
    rows = np.log(np.maximum(rows, np.finfo(np.float32).tiny)).astype(np.float32)
  table = jnp.asarray(rows)

  def teacher(labels):
    return jnp.take(table, jnp.asarray(labels), axis=0)

  return teacher


def reffakd(soft_labels, *, alpha: float = 0.5, temperature: float = 1.0,
            variant: str = "faithful") -> Method:
  r"""ReffAKD's student loss against the autoencoder soft labels. Stateless.

  With `t = S_soft[y]` the soft-label row of the example's class (`soft_labels`, from
  `losses.reffakd_soft_labels(S)`; the trainer gets it from the `selfkd_jax.reffakd` artifact):

  'faithful' (`cifar100/tinySLG_distillation.ipynb`, `F.cross_entropy(z/T, t)·α·T²`):

  .. math::
    L = (1-\alpha)\,\mathrm{CE}(z, y) + \alpha T^2 \cdot
        \Big(-\sum_k t_k \log \mathrm{softmax}(z/T)_k\Big).

  'kldiv_mean' (the Fashion-MNIST and Tiny-ImageNet notebooks: `nn.KLDivLoss()` with its
  default element-wise mean over the `B × C` entries, i.e. a further `1/C` per example):

  .. math::
    L = (1-\alpha)\,\mathrm{CE}(z, y) + \frac{\alpha T^2}{C}\,
        \mathrm{KL}\big(t \,\|\, \mathrm{softmax}(z/T)\big).

  The two soft terms differ by the constant entropy `H(t)` (the KL) and the factor `1/C`: the
  same gradient direction, `C` times weaker in 'kldiv_mean'. In both the targets are the
  soft labels as made (`τ_s`, default 1); only the student is divided by `T`.

  Defaults `α = 0.5`, `T = 1`: our choice. The notebooks sweep `T ∈ {20, 10, 5, 1}` ×
  `α ∈ {0.1, …, 0.9}` (200 epochs each) and record no pick (their outputs are cleared).
  `T = 1` compares the student with the soft labels at the temperature they were made at.
  A larger `T` pulls the student's logits towards `T·S[y]` (up to a constant), which makes
  the nearly uniform rows informative; sweep it.

  Args:
    soft_labels: `[C, C]` rows summing to 1 (a constant: no gradient flows into it).
    alpha: weight `α ∈ [0, 1]` of the soft term.
    temperature: student temperature `T > 0`.
    variant: 'faithful' or 'kldiv_mean'.

  Returns:
    A stateless `Method`; `update` reads `outputs['logits']` and `batch['label']` and returns
    the per-example loss and the metrics `reffakd_ce` and `reffakd_soft` (batch means of
    the CE and of the soft term before weighting).

  References:
    Doshi & Kim, ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
    arXiv 2404.09886 (code: github.com/JEKimLab/ReffAKD).
  """
  rows = _check_soft_labels(soft_labels, "reffakd")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"reffakd: alpha must be in [0, 1], got {alpha}")
  if not temperature > 0:
    raise ValueError(f"reffakd: temperature must be positive, got {temperature}")
  if variant not in VARIANTS:
    raise ValueError(f"reffakd: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
  num_classes = rows.shape[0]
  table = jnp.asarray(rows)
  # H(t) of every row, with 0·log 0 = 0: KL(t‖q) = soft_ce(z/T, t) − H(t).
  safe_rows = np.where(rows > 0, rows, 1.0)
  entropies = jnp.asarray(-np.sum(np.where(rows > 0, rows * np.log(safe_rows), 0.0), axis=1),
                          dtype=jnp.float32)

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name, hooks
    logits, labels = logits_and_labels("reffakd", outputs, batch)
    if logits.shape[-1] != num_classes:
      raise ValueError(f"reffakd: the model has {logits.shape[-1]} classes but soft_labels "
                       f"{num_classes}")
    ce = losses.cross_entropy(logits, labels)
    targets = jnp.take(table, labels, axis=0)
    soft = losses.soft_cross_entropy(logits.astype(jnp.float32) / temperature, targets)
    if variant == "kldiv_mean":
      soft = (soft - jnp.take(entropies, labels, axis=0)) / num_classes
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * soft
    return loss, state, {"reffakd_ce": jnp.mean(ce), "reffakd_soft": jnp.mean(soft)}

  return Method(stateless_init, update)
