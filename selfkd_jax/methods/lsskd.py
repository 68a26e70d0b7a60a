"""LSSKD: layered self-supervised knowledge distillation (a reconstruction, arXiv 2506.07055)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import (Method, check_arguments, check_state, check_steps_per_epoch,
                                     checked_indices, checked_labels, epoch_of_step,
                                     require_outputs)
from selfkd_jax.methods.per_example import (PerExampleTable, create_table, first_visit_one_hot,
                                            gather_rows, scatter_rows)

ROTATIONS = 4  # 0, 90, 180, 270 degrees
STORAGE_DTYPES = (jnp.float32, jnp.bfloat16)
_OUT_OF_RANGE = jnp.iinfo(jnp.int32).max  # a row id no table has: reads 0/clamped, writes drop


class LSSKDState(NamedTuple):
  """LSSKD's state. Tables are sharded by rows under data parallelism, the rest replicated.

  Attributes:
    main_predictions: `[N, C]` past softmax predictions of the model's own classifier on the
      un-rotated images (row = dataset index), or `None` when `main_pskd=False`.
    aux_predictions: one `[4·N, 4·C]` table per auxiliary head (shallowest first): row
      `4·i + k` holds the head's last softmax prediction (over the 4C joint classes) for
      example `i` rotated by `k·90°`.
  """
  main_predictions: PerExampleTable | None
  aux_predictions: tuple[PerExampleTable, ...]


def rotate_batch(images: jax.Array) -> jax.Array:
  """`[x; rot90(x); rot180(x); rot270(x)]` (rotation-major, `[4·B, H, W, C]`): LSSKD's inputs.

  The data-side half of LSSKD: run the model (with its heads) on `rotate_batch(images)` and
  pass those outputs, with the un-rotated `batch`, to `lsskd(...).update`.

  Row `k·B + b` is image `b` rotated by `k·90°` counter-clockwise in the (H, W) plane
  (`jnp.rot90(x, k, axes=(1, 2))`, the same as HSAKD's `torch.rot90(x, k, (2, 3))` on NCHW).
  The first B rows are the batch itself.

  Raises:
    ValueError: at trace time, if the images are not `[B, H, W, C]` with `H == W`.
  """
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"lsskd: rotations need square [B, H, W, C] images, got {images.shape}")
  return jnp.concatenate([jnp.rot90(images, k, axes=(1, 2)) for k in range(ROTATIONS)], axis=0)


def joint_labels(labels: jax.Array, rotations: int = ROTATIONS) -> jax.Array:
  """Joint labels of the rotation-major rows: row `k·B + b` gets `4·y_b + k` (HSAKD's layout)."""
  labels = jnp.asarray(labels)
  return jnp.concatenate([rotations * labels + k for k in range(rotations)], axis=0)


def joint_row_ids(indices: jax.Array, num_examples: int, rotations: int = ROTATIONS) -> jax.Array:
  """Auxiliary-table rows of the rotation-major rows: row `k·B + b` -> `4·index_b + k`.

  Indices outside `[0, num_examples)` (padding examples) map to a row id past every table,
  so their writes are dropped.
  """
  indices = jnp.asarray(indices)
  valid = (indices >= 0) & (indices < num_examples)
  return jnp.concatenate(
      [jnp.where(valid, rotations * indices + k, _OUT_OF_RANGE) for k in range(rotations)],
      axis=0)


def _accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _safe_sqrt(x):
  """sqrt with a zero (sub)gradient at 0 (plain sqrt has an infinite one)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def lsskd_aux_terms(logits: Sequence[jax.Array], features: Sequence[jax.Array],
                    final_features: jax.Array, targets: Sequence[jax.Array], *,
                    temperature: float, distill_weight: float, feature_weight: float,
                    aux_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The auxiliary heads' loss per row (one row per (example, rotation)), unreduced.

  For heads `h = 1..H` (shallowest first; `H` is the deepest auxiliary head), joint logits
  `z_h`, adapted features `a_h`, soft targets `q_h` and the backbone's features `f` of the
  same (rotated) image:

      l = sum_h [ aux_weight · soft_ce(z_h, q_h)
                  + feature_weight · ||a_h - sg(f)||_2 ]
          + distill_weight · sum_{h < H} T² · KL(softmax(sg(z_H) / T) || softmax(z_h / T))

  The feature distance is the unsquared L2 norm per row (BYOT journal), with a zero gradient
  at 0. No gradient reaches `z_H` through the KL terms (the deepest head is their teacher),
  nor `f`, nor `q_h`.

  Args:
    logits: per head, `[M, J]` joint logits.
    features: per head, `[M, d]` adapted features.
    final_features: `[M, d]` backbone features (stop-gradient here).
    targets: per head, `[M, J]` target distributions (stop-gradient here).
    temperature, distill_weight, feature_weight, aux_weight: see `lsskd`.

  Returns:
    `(per_row [M], terms)` with `terms['ce']`, `terms['distill']` (zeros for the deepest
    head) and `terms['feature']`: per head `[H, M]` unweighted terms.
  """
  final_features = lax.stop_gradient(final_features).astype(jnp.float32)
  teacher = lax.stop_gradient(logits[-1])
  ce, distill, feature = [], [], []
  for h, (z, a, q) in enumerate(zip(logits, features, targets)):
    ce.append(losses.soft_cross_entropy(z, lax.stop_gradient(q)))
    if h < len(logits) - 1:
      distill.append(losses.distillation_kl(z, teacher, temperature))
    else:
      distill.append(jnp.zeros(z.shape[:-1], jnp.float32))
    squared = jnp.sum(jnp.square(a.astype(jnp.float32) - final_features), axis=-1)
    feature.append(_safe_sqrt(squared))
  terms = {"ce": jnp.stack(ce), "distill": jnp.stack(distill), "feature": jnp.stack(feature)}
  per_row = jnp.sum(aux_weight * terms["ce"] + distill_weight * terms["distill"]
                    + feature_weight * terms["feature"], axis=0)
  return per_row, terms


def lsskd(num_examples: int, num_classes: int, num_epochs: int, *, num_heads: int,
          steps_per_epoch: int, alpha_T: float = 0.8, aux_alpha_T: float | None = None,
          temperature: float = 3.0,
          aux_weight: float = 1.0, distill_weight: float = 1.0, feature_weight: float = 0.03,
          main_pskd: bool = True, storage_dtype: Any = jnp.float32) -> Method:
  r"""LSSKD (reconstruction): HSAKD's rotation heads on every stage, trained PS-KD style.

  This is a **reconstruction** from the paper's description (arXiv 2506.07055, no official
  code), built from HSAKD's self-supervised augmented task and PS-KD's and BYOT's losses.

  Inputs: the caller turns a batch of B images into `[x; rot90(x); rot180(x); rot270(x)]`
  with `rotate_batch` (4·B rows, rotation-major); the model and its heads
  (`heads.ExitHead(models.exits.make_exits('hsakd', ...))`, attached with `heads.with_heads`)
  see all of them, and `update` gets their outputs with the un-rotated `batch` (B rows).
  Row `k·B + b` is example `b` rotated by `k·90°`; its joint label is `4·y_b + k` (HSAKD's
  layout: class-major, rotation-minor, `4C` joint classes) and its row in the heads'
  past-prediction tables is `4·index_b + k`.

  Loss of example `b` (the value `update` returns, `[B]`):

      L_b = main_b + (1/4) sum_k l_{k·B+b}

  - `main_b`, the model's own classifier on the un-rotated copy only (rows `:B`): PS-KD with
    its own past predictions, `soft_ce(z, (1-α_e)·onehot(y) + α_e·P[i])`, `P` refreshed every
    step (`methods.pskd` with `refresh='step'`: read this batch's rows, then write this
    step's softmax); `α_e = alpha_T·min(e+1, E)/E`; one-hot targets on a first visit. Plain
    CE when `main_pskd=False`. The rotated copies give the main classifier no loss.
  - `l_r` (`lsskd_aux_terms`) on every row r (all four rotations): for each auxiliary head h,
    `aux_weight · soft_ce(z_h, (1-α'_e)·onehot(4y+k) + α'_e·P_h[4i+k])` with the head's own
    past joint predictions (same schedule with `aux_alpha_T`, one-hot on a first visit, refreshed
    every step), plus `feature_weight · ||adapter_h(f_h) - sg(f)||` with `f` the backbone's
    `outputs['features']` of the same rotated image; and for every head shallower than the
    deepest auxiliary head, `distill_weight · T² · KL(softmax(sg(z_deepest)/T) ||
    softmax(z_h/T))` on the joint logits.

  Reduction: averaging `L_b` over the batch gives `mean_B(main) + sum_h mean_{4B}(aux terms
  of h)`: every auxiliary term is a mean over all `4·B` (example, rotation) rows, as HSAKD
  averages its joint-label loss over the rotated batch, and the main term a mean over the B
  un-rotated rows.

  Ours / choices of the reconstruction:
    - Heads: `models.exits.make_exits('hsakd', ...)` (stage copies, pool, FC over 4C), one on
      every stage including the last; "deepest auxiliary head" = the last of `exits`. The
      deepest head gets the PS-KD CE and the feature term but no KL (it is the teacher).
    - The feature term is on every head and every rotation, unsquared L2 per example (BYOT
      journal), with each head's linear adapter.
    - The heads are a head of the model, trained with it by the caller's optimizer in one
      backward pass (the backbone gets the heads' gradients through its stage features). They
      run in train mode (BatchNorm over all 4·B rows of the global batch when the head has
      `bn_axis_name`). The tables store the step's forward predictions, as PS-KD does.
    - Evaluation: `outputs['exit_class_logits']` holds each head's class logits for rotation
      0, i.e. its joint logits at columns `4·y + 0` (HSAKD's `logits[:, 0::4]`), on the plain
      images. The heads are dropped at inference and export (`heads.backbone_variables`).

  Memory: the main table is `N·C` entries, every head's table `4N·4C = 16·N·C`; with H heads
  `(1 + 16·H)·N·C·bytes` in all, divided by the number of devices (rows are sharded, see
  `methods.per_example`); `storage_dtype=jnp.bfloat16` halves it. CIFAR-100 (N 50k, C 100)
  with 4 heads, fp32: 1.3 GB, i.e. 0.33 GB per device on 4 devices.

  Args:
    num_examples: N, the training set size (dataset indices `0..N-1`).
    num_classes: C.
    num_epochs: E, the length of the PS-KD schedule.
    num_heads: H, the number of auxiliary heads (`exits.num_exits`), one table each.
    steps_per_epoch: optimizer steps per epoch: `update`'s 0-based `step` gives the epoch.
    alpha_T: the main classifier's final share of past predictions, in [0, 1]. Default 0.8.
    aux_alpha_T: the same for the heads; None (default) = `alpha_T`.
    temperature: T > 0 of the deep-to-shallow KL. Default 3.
    aux_weight: weight of the heads' PS-KD CE, >= 0. Default 1.
    distill_weight: weight of the deep-to-shallow KL, >= 0. Default 1.
    feature_weight: weight of the feature L2, >= 0. Default 0.03.
    main_pskd: PS-KD targets for the main classifier (default) or plain CE.
    storage_dtype: dtype of the past-prediction tables, jnp.float32 or jnp.bfloat16.

  Returns:
    A `Method`. `update` reads `outputs['logits']`, `outputs['features']`,
    `outputs['exit_logits']` (H arrays `[4·B, 4·C]`), `outputs['exit_features']` (all with 4·B
    rows), `batch['label']` and `batch['index']` (B rows). Metrics: `lsskd_alpha`,
    `lsskd_aux_alpha`, `lsskd_main_loss`, `lsskd_{name}_accuracy` (rotation-task accuracy
    over the 4·B rows), `lsskd_{name}_class_accuracy` (class accuracy on the un-rotated rows
    from the rotation-0 columns), `lsskd_aux_ce` (sum over heads), `lsskd_distill` (sum over
    the shallower heads of `T²·KL`, unweighted), `lsskd_feature_loss` (sum over heads,
    unweighted).

  References:
    LSSKD, arXiv 2506.07055; Yang et al., Hierarchical Self-supervised Augmented Knowledge
    Distillation (HSAKD), IJCAI 2021, arXiv 2107.13715, code winycg/HSAKD; Kim et al., PS-KD,
    ICCV 2021, arXiv 2006.12000; Zhang et al., BYOT, ICCV 2019 / TPAMI 2021.
  """
  aux_alpha_T = alpha_T if aux_alpha_T is None else aux_alpha_T
  check_arguments(
      "lsskd", *((name, v, v > 0, "positive") for name, v in (
          ("num_examples", num_examples), ("num_classes", num_classes),
          ("num_epochs", num_epochs), ("num_heads", num_heads))),
      *((name, v, 0.0 <= v <= 1.0, "in [0, 1]") for name, v in (
          ("alpha_T", alpha_T), ("aux_alpha_T", aux_alpha_T))),
      ("temperature", temperature, temperature > 0.0, "> 0"),
      *((name, v, v >= 0.0, ">= 0") for name, v in (
          ("aux_weight", aux_weight), ("distill_weight", distill_weight),
          ("feature_weight", feature_weight))))
  check_steps_per_epoch("lsskd", steps_per_epoch, "the PS-KD schedule")
  if not any(jnp.dtype(storage_dtype) == jnp.dtype(d) for d in STORAGE_DTYPES):
    raise ValueError(f"lsskd: storage_dtype must be float32 or bfloat16, got {storage_dtype}")
  joint_classes = ROTATIONS * num_classes

  def init(rng=None) -> LSSKDState:
    del rng
    main = create_table(num_examples, (num_classes,), storage_dtype) if main_pskd else None
    aux = tuple(create_table(ROTATIONS * num_examples, (joint_classes,), storage_dtype)
                for _ in range(num_heads))
    return LSSKDState(main, aux)

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del hooks
    epoch = epoch_of_step(step, steps_per_epoch)
    check_state("lsskd", state, LSSKDState)
    labels = checked_labels("lsskd", batch)  # per image; the model sees 4 rotations of each
    batch_size = labels.shape[0]
    indices = checked_indices("lsskd", batch, (batch_size,))
    head_logits, head_features = _checked_head_outputs(outputs, batch_size, num_heads,
                                                       joint_classes)
    logits = outputs["logits"]
    # Main classifier: un-rotated rows only.
    main_logits = logits[:batch_size]
    alpha = losses.pskd_alpha(epoch, num_epochs, alpha_T)
    main_table = state.main_predictions
    if main_pskd:
      main_targets = _past_targets(main_table, indices, labels, num_classes, alpha, axis_name)
      main_loss = losses.soft_cross_entropy(main_logits, main_targets)
      main_table = _write(main_table, indices, main_logits, axis_name, after=main_targets)
    else:
      main_loss = losses.cross_entropy(main_logits, labels)

    # Auxiliary heads: every (example, rotation) row.
    aux_alpha = losses.pskd_alpha(epoch, num_epochs, aux_alpha_T)
    joint = joint_labels(labels)
    row_ids = joint_row_ids(indices, num_examples)
    targets = tuple(_past_targets(table, row_ids, joint, joint_classes, aux_alpha, axis_name)
                    for table in state.aux_predictions)

    per_row, terms = lsskd_aux_terms(head_logits, head_features, outputs["features"], targets,
                                     temperature=temperature, distill_weight=distill_weight,
                                     feature_weight=feature_weight, aux_weight=aux_weight)
    loss = main_loss + jnp.mean(per_row.reshape(ROTATIONS, batch_size), axis=0)
    aux_tables = tuple(_write(table, row_ids, z, axis_name, after=read)
                       for table, z, read in zip(state.aux_predictions, head_logits, targets))
    new_state = LSSKDState(main_table, aux_tables)

    metrics = _metrics(alpha, aux_alpha, main_loss, head_logits, terms, labels, joint)
    return loss, new_state, metrics

  return Method(init, update)


def _past_targets(table, row_ids, labels, num_outputs, alpha, axis_name):
  """PS-KD targets from a table's rows (one-hot on a first visit, a row never written)."""
  past = gather_rows(table, row_ids, axis_name).astype(jnp.float32)
  past = first_visit_one_hot(past, labels, num_outputs)
  return losses.pskd_targets(labels, past, alpha)


def _write(table, row_ids, logits, axis_name, after):
  """Writes the rows' softmax; `after` (what was read from `table`) keeps the update in place."""
  probs = jax.nn.softmax(lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  return scatter_rows(table, row_ids, probs, axis_name, after=after)


def _checked_head_outputs(outputs, batch_size, num_heads, joint_classes):
  """`(exit_logits, exit_features)` after checking rows, head count and widths (trace time)."""
  require_outputs("lsskd", outputs, ("features", "exit_logits", "exit_features"),
                  "attach heads.ExitHead(make_exits('hsakd', ...)) with heads.with_heads")
  rows = outputs["logits"].shape[0]
  if rows != ROTATIONS * batch_size:
    raise ValueError(f"lsskd: outputs have {rows} rows for a batch of {batch_size}; run the "
                     "model on rotate_batch(images)")
  head_logits, head_features = tuple(outputs["exit_logits"]), tuple(outputs["exit_features"])
  if len(head_logits) != num_heads:
    raise ValueError(f"lsskd: the model has {len(head_logits)} heads, built for "
                     f"num_heads={num_heads}")
  width = outputs["features"].shape[-1]
  for z, a in zip(head_logits, head_features):
    if z.shape[0] != rows or a.shape[0] != rows:
      raise ValueError(f"lsskd: head outputs have {z.shape[0]} rows, the model's {rows}; run "
                       "the heads on the same rotated batch")
    if z.shape[-1] != joint_classes:
      raise ValueError(f"lsskd: head logits {z.shape} need {joint_classes} joint classes "
                       "(make_exits('hsakd', ...))")
    if a.shape[-1] != width:
      raise ValueError(f"lsskd: head features have width {a.shape[-1]}, the model's "
                       f"features {width}")
  return head_logits, head_features


def _metrics(alpha, aux_alpha, main_loss, head_logits, terms, labels, joint):
  batch_size = labels.shape[0]
  metrics = {"lsskd_alpha": jnp.asarray(alpha, jnp.float32),
             "lsskd_aux_alpha": jnp.asarray(aux_alpha, jnp.float32),
             "lsskd_main_loss": jnp.mean(main_loss)}
  for k, z in enumerate(head_logits):
    metrics[f"lsskd_exit{k + 1}_accuracy"] = _accuracy(z, joint)
    metrics[f"lsskd_exit{k + 1}_class_accuracy"] = _accuracy(z[:batch_size, 0::ROTATIONS],
                                                             labels)
  metrics.update(lsskd_aux_ce=jnp.sum(jnp.mean(terms["ce"], axis=1)),
                 lsskd_distill=jnp.sum(jnp.mean(terms["distill"], axis=1)),
                 lsskd_feature_loss=jnp.sum(jnp.mean(terms["feature"], axis=1)))
  return metrics
