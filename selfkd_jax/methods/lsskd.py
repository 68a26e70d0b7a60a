"""LSSKD: layered self-supervised knowledge distillation (a reconstruction, arXiv 2506.07055)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, check_steps_per_epoch, epoch_of_step
from selfkd_jax.methods.owned_params import owned_exits, owned_params_step
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
    exit_params: the heads' parameters (stage copies, joint classifiers, adapters).
    exit_batch_stats: the heads' BatchNorm running statistics.
    exit_opt_state: the state of `exit_optimizer` for `exit_params`.
  """
  main_predictions: PerExampleTable | None
  aux_predictions: tuple[PerExampleTable, ...]
  exit_params: Any
  exit_batch_stats: Any
  exit_opt_state: Any


def rotate_batch(images: jax.Array) -> jax.Array:
  """`[x; rot90(x); rot180(x); rot270(x)]` (rotation-major, `[4·B, H, W, C]`).

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


def lsskd(exits: Any, num_examples: int, num_classes: int, num_epochs: int, *,
          steps_per_epoch: int, alpha_T: float = 0.8, aux_alpha_T: float | None = None,
          temperature: float = 3.0,
          aux_weight: float = 1.0, distill_weight: float = 1.0, feature_weight: float = 0.03,
          main_pskd: bool = True, storage_dtype: Any = jnp.float32,
          exit_optimizer: optax.GradientTransformation | None = None) -> Method:
  r"""LSSKD (reconstruction): HSAKD's rotation heads on every stage, trained PS-KD style.

  This is a **reconstruction** from the paper's description (arXiv 2506.07055, no official
  code), built from HSAKD's self-supervised augmented task and PS-KD's and BYOT's losses.

  Inputs: `train_inputs` turns a batch of B images into `[x; rot90(x); rot180(x); rot270(x)]`
  (4·B rows, rotation-major, see `rotate_batch`); the model and the heads see all of them.
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
    - The heads are owned by the method, as `methods.byot`: their variables live in the state
      and they are trained with `exit_optimizer` (default `optax.sgd(0.1, momentum=0.9)`) on
      the gradient of the mean loss (averaged over devices with `pmean`); the returned loss
      applies them with their current parameters, so the backbone gets the heads' gradients
      through its stage features. By default `update` steps them itself from a second pass
      on stop-gradient stage features; the trainer differentiates backbone and heads in one
      backward pass instead (`Method.owned`, `hooks.owned_differentiated`). They run in train mode (BatchNorm over all 4·B rows of the global batch when
      `axis_name` is given). The tables store the loss pass's predictions (before the heads'
      step), as PS-KD stores the prediction of the step's forward pass.
    - Evaluation: `exit_logits` gives each head's class logits for rotation 0, i.e. its joint
      logits at columns `4·y + 0` (HSAKD's `logits[:, 0::4]`), from eval-mode outputs of the
      plain images. The heads are dropped at inference and export.

  Memory: the main table is `N·C` entries, every head's table `4N·4C = 16·N·C`; with H heads
  `(1 + 16·H)·N·C·bytes` in all, divided by the number of devices (rows are sharded, see
  `methods.per_example`); `storage_dtype=jnp.bfloat16` halves it. CIFAR-100 (N 50k, C 100)
  with 4 heads, fp32: 1.3 GB, i.e. 0.33 GB per device on 4 devices.

  Args:
    exits: the auxiliary heads (`models.exits.make_exits('hsakd', ...)`, an unbound `Exits`
      with `rotations=4`); their logits must have `4 · num_classes` columns.
    num_examples: N, the training set size (dataset indices `0..N-1`).
    num_classes: C.
    num_epochs: E, the length of the PS-KD schedule.
    steps_per_epoch: optimizer steps per epoch: `update`'s 0-based `step` gives the epoch.
    alpha_T: the main classifier's final share of past predictions, in [0, 1]. Default 0.8.
    aux_alpha_T: the same for the heads; None (default) = `alpha_T`.
    temperature: T > 0 of the deep-to-shallow KL. Default 3.
    aux_weight: weight of the heads' PS-KD CE, >= 0. Default 1.
    distill_weight: weight of the deep-to-shallow KL, >= 0. Default 1.
    feature_weight: weight of the feature L2, >= 0. Default 0.03.
    main_pskd: PS-KD targets for the main classifier (default) or plain CE.
    storage_dtype: dtype of the past-prediction tables, jnp.float32 or jnp.bfloat16.
    exit_optimizer: optax transformation training the heads and adapters.

  Returns:
    A `Method` with `train_inputs` (the four rotations) and `exit_logits`. `update` reads
    `outputs['logits']`, `outputs['features']`, `outputs['stage_features']` (all with 4·B
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
  missing = [a for a in ("apply", "init_variables", "num_exits", "names", "feature_dim",
                         "num_outputs") if not hasattr(exits, a)]
  if missing:
    raise ValueError(f"lsskd: exits must be a models.exits.Exits (lacks {', '.join(missing)})")
  if num_examples <= 0 or num_classes <= 0 or num_epochs <= 0:
    raise ValueError(f"lsskd: num_examples, num_classes and num_epochs must be positive, got "
                     f"{num_examples}, {num_classes}, {num_epochs}")
  check_steps_per_epoch("lsskd", steps_per_epoch, "the PS-KD schedule")
  if exits.num_outputs != ROTATIONS * num_classes:
    raise ValueError(f"lsskd: exits predict {exits.num_outputs} classes, the rotation task "
                     f"needs {ROTATIONS}·{num_classes} (make_exits('hsakd', ...))")
  if exits.num_exits < 1:
    raise ValueError("lsskd: needs at least one auxiliary head")
  if aux_alpha_T is None:
    aux_alpha_T = alpha_T
  for name, value in (("alpha_T", alpha_T), ("aux_alpha_T", aux_alpha_T)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"lsskd: {name} must be in [0, 1], got {value}")
  if not temperature > 0.0:
    raise ValueError(f"lsskd: temperature must be > 0, got {temperature}")
  for name, value in (("aux_weight", aux_weight), ("distill_weight", distill_weight),
                      ("feature_weight", feature_weight)):
    if not value >= 0.0:
      raise ValueError(f"lsskd: {name} must be >= 0, got {value}")
  if not any(jnp.dtype(storage_dtype) == jnp.dtype(d) for d in STORAGE_DTYPES):
    raise ValueError(f"lsskd: storage_dtype must be float32 or bfloat16, got {storage_dtype}")
  if exit_optimizer is None:
    exit_optimizer = optax.sgd(0.1, momentum=0.9)
  names = exits.names
  joint_classes = ROTATIONS * num_classes

  def init(rng=None) -> LSSKDState:
    variables = exits.init_variables(rng)
    main = create_table(num_examples, (num_classes,), storage_dtype) if main_pskd else None
    aux = tuple(create_table(ROTATIONS * num_examples, (joint_classes,), storage_dtype)
                for _ in range(exits.num_exits))
    return LSSKDState(main, aux, variables["params"], variables["batch_stats"],
                      exit_optimizer.init(variables["params"]))

  def past_targets(table, row_ids, labels, num_outputs, alpha, axis_name):
    past = gather_rows(table, row_ids, axis_name).astype(jnp.float32)
    past = first_visit_one_hot(past, labels, num_outputs)  # PS-KD: one-hot on a first visit
    return losses.pskd_targets(labels, past, alpha)

  def write(table, row_ids, logits, axis_name):
    probs = jax.nn.softmax(lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return scatter_rows(table, row_ids, probs, axis_name)

  def head_losses(params, batch_stats, stage_features, final_features, targets, axis_name):
    (logits, features), updates = exits.apply(
        {"params": params, "batch_stats": batch_stats}, stage_features, train=True,
        axis_name=axis_name, mutable=["batch_stats"])
    for z in logits:
      if z.shape[-1] != joint_classes:
        raise ValueError(f"lsskd: head logits {z.shape} need {joint_classes} joint classes")
    per_row, terms = lsskd_aux_terms(logits, features, final_features, targets,
                                     temperature=temperature, distill_weight=distill_weight,
                                     feature_weight=feature_weight, aux_weight=aux_weight)
    return per_row, (logits, updates["batch_stats"], terms)

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    epoch = epoch_of_step(step, steps_per_epoch)
    for key in ("logits", "features", "stage_features"):
      if key not in outputs:
        raise ValueError(f"lsskd: needs outputs[{key!r}]")
    labels, indices = batch["label"], batch["index"]
    batch_size = labels.shape[0]
    logits = outputs["logits"]
    if logits.shape[0] != ROTATIONS * batch_size:
      raise ValueError(f"lsskd: outputs have {logits.shape[0]} rows for a batch of "
                       f"{batch_size}; run the model on method.train_inputs(images)")
    final_features = lax.stop_gradient(outputs["features"]).astype(jnp.float32)
    if final_features.shape[-1] != exits.feature_dim:
      raise ValueError(f"lsskd: features have width {final_features.shape[-1]}, exits were "
                       f"built for feature_dim={exits.feature_dim}")
    stage_features = tuple(outputs["stage_features"])

    # Main classifier: un-rotated rows only.
    main_logits = logits[:batch_size]
    alpha = losses.pskd_alpha(epoch, num_epochs, alpha_T)
    main_table = state.main_predictions
    if main_pskd:
      main_targets = past_targets(main_table, indices, labels, num_classes, alpha, axis_name)
      main_loss = losses.soft_cross_entropy(main_logits, main_targets)
      main_table = write(main_table, indices, main_logits, axis_name)
    else:
      main_loss = losses.cross_entropy(main_logits, labels)

    # Auxiliary heads: every (example, rotation) row.
    aux_alpha = losses.pskd_alpha(epoch, num_epochs, aux_alpha_T)
    joint = joint_labels(labels)
    row_ids = joint_row_ids(indices, num_examples)
    targets = tuple(past_targets(table, row_ids, joint, joint_classes, aux_alpha, axis_name)
                    for table in state.aux_predictions)

    # The backbone's loss: the heads with their current parameters, stage features live.
    per_row, (head_logits, new_stats, terms) = head_losses(
        state.exit_params, state.exit_batch_stats, stage_features, final_features, targets,
        axis_name)
    aux_loss = jnp.mean(per_row.reshape(ROTATIONS, batch_size), axis=0)
    loss = main_loss + aux_loss

    exit_params, opt_state = state.exit_params, state.exit_opt_state
    if not (hooks is not None and hooks.owned_differentiated):
      # The heads' own step: the same terms on stop-gradient stage features. (Otherwise the
      # caller differentiates the heads with the backbone and steps them: `owned`.)
      def step_loss(params):
        rows, aux = head_losses(params, state.exit_batch_stats,
                                lax.stop_gradient(stage_features), final_features, targets,
                                axis_name)
        return jnp.mean(rows), aux

      grads, (_, new_stats, _) = jax.grad(step_loss, has_aux=True)(state.exit_params)
      exit_params, opt_state = owned_params_step(exit_optimizer, state.exit_params,
                                                 state.exit_opt_state, grads, axis_name)
    aux_tables = tuple(write(table, row_ids, z, axis_name)
                       for table, z in zip(state.aux_predictions, head_logits))
    new_state = LSSKDState(main_table, aux_tables, exit_params, new_stats, opt_state)

    metrics = {"lsskd_alpha": jnp.asarray(alpha, jnp.float32),
               "lsskd_aux_alpha": jnp.asarray(aux_alpha, jnp.float32),
               "lsskd_main_loss": jnp.mean(main_loss)}
    for name, z in zip(names, head_logits):
      metrics[f"lsskd_{name}_accuracy"] = _accuracy(z, joint)
      metrics[f"lsskd_{name}_class_accuracy"] = _accuracy(z[:batch_size, 0::ROTATIONS], labels)
    metrics.update(lsskd_aux_ce=jnp.sum(jnp.mean(terms["ce"], axis=1)),
                   lsskd_distill=jnp.sum(jnp.mean(terms["distill"], axis=1)),
                   lsskd_feature_loss=jnp.sum(jnp.mean(terms["feature"], axis=1)))
    return loss, new_state, metrics

  def exit_logits(state, outputs):
    logits, _ = exits.apply({"params": state.exit_params, "batch_stats": state.exit_batch_stats},
                            tuple(outputs["stage_features"]), train=False)
    return {name: z[:, 0::ROTATIONS] for name, z in zip(names, logits)}

  return Method(init, update, exit_logits=exit_logits, train_inputs=rotate_batch,
                owned=owned_exits(exit_optimizer))
