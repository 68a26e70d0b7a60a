"""BYOT: Be Your Own Teacher (self-distillation into auxiliary exits on every stage)."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method
from selfkd_jax.methods.owned_params import owned_exits, owned_params_step

VARIANTS = ("journal", "conference")
FEATURE_NORMS = ("example", "batch")


class ByotState(NamedTuple):
  """The exits' variables and the state of the optimizer that trains them (all replicated).

  Attributes:
    exit_params: `Exits` parameters (every exit's conv stack, classifier and adapter).
    exit_batch_stats: the exits' BatchNorm running statistics (updated in every `update`).
    exit_opt_state: the state of `exit_optimizer` for `exit_params`.
  """
  exit_params: Any
  exit_batch_stats: Any
  exit_opt_state: Any


def _accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _safe_sqrt(x):
  """sqrt with a zero (sub)gradient at 0, like `torch.dist` (plain sqrt has an infinite one)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _feature_terms(squared, variant, feature_norm, axis_name):
  """Per-example feature loss from per-example squared distances `[B]`.

  'example': `||d_b||` (journal) or `||d_b||²` (conference) per example.
  'batch': the norm of the whole global batch's difference matrix D, as `torch.dist` on the
  batch: `||D||_F` (journal) or `||D||_F²` (conference). Every example carries that value and
  the gradient of the global-batch mean is exactly that of `||D||_F` (resp. `||D||_F²`); the
  cross-device sum is taken under `stop_gradient` only, so no collective is differentiated.
  """
  if feature_norm == "example":
    return _safe_sqrt(squared) if variant == "journal" else squared
  total = jnp.sum(lax.stop_gradient(squared))
  global_batch = squared.shape[0]
  if axis_name is not None:
    total = lax.psum(total, axis_name)
    global_batch = global_batch * lax.psum(1, axis_name)
  moving = squared - lax.stop_gradient(squared)  # value 0, gradient that of ||d_b||²
  if variant == "conference":
    return total + global_batch * moving
  norm = _safe_sqrt(total)
  safe_norm = jnp.where(total > 0, norm, 1.0)
  return jnp.where(total > 0, norm + global_batch * moving / (2.0 * safe_norm), 0.0)


def byot(exits: Any, *, alpha: float = 0.3, temperature: float = 3.0,
         feature_weight: float = 0.03, variant: str = "journal", feature_norm: str = "batch",
         feature_exits: Sequence[int] | None = None,
         exit_optimizer: optax.GradientTransformation | None = None) -> Method:
  r"""Be Your Own Teacher (BYOT): every stage gets an exit distilled from the deepest one.

  With the backbone's own classifier as the deepest exit (logits `z`, pooled features `f`,
  both `sg` in the distillation terms) and exits `i = 1..n` on the earlier stages (logits
  `z_i`, adapted features `a_i = adapter_i(f_i)`, from `exits`):

      L = CE(z, y) + sum_i [ (1 - alpha) CE(z_i, y)
                             + alpha s soft_ce(z_i / T, softmax(sg(z) / T))
                             + lambda D(a_i, sg(f)) ]

  journal (default, ArchipLab-LinfengZhang/pytorch-self-distillation-final `train.py`):
  `s = 1` (no T²), `D = ||a_i - f||_2` (not squared), linear adapters.
  conference (BYOT, ICCV 2019): `s = T²`, `D = ||a_i - f||_2²`; the faithful conference setup
  also has no adapters: `make_exits(..., adapters=False)` (exit width == feature width).
  `soft_ce` is a soft cross-entropy (the official `CrossEntropy`), not a KL; the two differ
  by the teacher's entropy, so the gradients are the same.

  Faithful to the official journal code: the loss above with alpha 0.3, T 3, lambda 0.03;
  the exits' architecture (`models.exits.ByotExit`: SepConv stacks, attention gates,
  pool, FC); the deepest features are the backbone's pooled features; the exits and adapters
  receive the gradient of the whole loss and the backbone receives the exits' terms
  through its stage features.

  Ours / differences (knobs where it matters):
    - `feature_norm='batch'` (default, faithful): the official code uses `torch.dist(a_i, f)`
      on the whole batch, i.e. the Frobenius norm of the `[B, d]` difference (computed here
      over the global batch across devices). `feature_norm='example'`: D per example, averaged
      over the batch like every other term. With equal per-example norms the batch norm is
      `sqrt(B)` times the mean per-example norm (≈ 11× at B = 128), so lambda 0.03 weighs the
      feature term ≈ 11× less with 'example' than in the official runs.
    - `feature_exits=None` (default) applies D to every exit, as the written formula. The
      official code skips the exit after stage 3 (its loop skips index 1 of the
      deepest-first list, although its comment says "the shallowest"): `feature_exits=(1, 2)`
      on a 4-stage ResNet reproduces it.
    - The exits are not part of the model: their variables live in this method's state and
      they are trained with `exit_optimizer` (default `optax.sgd(0.1, momentum=0.9)`; the
      trainer passes one built from the run's optimizer config) on the gradient of the mean
      loss — the exits' terms, since nothing else depends on them — averaged over devices
      with `pmean`. The returned loss applies the exits with their current parameters, so
      the backbone's gradient is the official one. Evaluation and export use the backbone
      alone with exactly its parameter count; `exit_logits` reports every exit's accuracy.
    - Who differentiates the exits: by default `update` takes their step itself, from a
      second pass of the exits on stop-gradient stage features. The trainer instead
      differentiates the loss with respect to backbone and exits together (`Method.owned`,
      `hooks.owned_differentiated`): one pass of the exits, the same gradient, the step
      taken after the backward pass.
    - The exits run in train mode in `update` (batch statistics of the global batch when
      `axis_name` is given); their running statistics are kept in the state and used by
      `exit_logits` (eval mode). Both passes of the exits (when there are two) see the same
      inputs and give the same statistics.

  Args:
    exits: the exits (`models.exits.make_exits('byot', ...)`, an unbound `Exits`; this module
      does not import the models package); their logits must have the backbone's number of
      classes.
    alpha: weight of the distillation term in [0, 1]. Default 0.3.
    temperature: T > 0. Default 3.
    feature_weight: lambda >= 0. Default 0.03.
    variant: 'journal' (default) or 'conference'.
    feature_norm: 'batch' (default) or 'example' (see above).
    feature_exits: 1-based exits that get the feature term; None = all.
    exit_optimizer: optax transformation training the exits and adapters.

  Returns:
    A `Method` whose state is a `ByotState` and whose `exit_logits(state, outputs)` gives
    `{'exit1': [B, C], ...}` (shallowest first) from eval-mode outputs. `update` reads
    `outputs['logits']`, `outputs['features']`, `outputs['stage_features']` and
    `batch['label']`. Metrics: `byot_exit{k}_accuracy` (train, before the exit step),
    `byot_exit_ce` (sum over exits of their CE), `byot_distill` (sum over exits of
    `s soft_ce`), `byot_feature_loss` (sum over the feature exits of D, unweighted).

  References:
    Zhang et al., Be Your Own Teacher: Improve the Performance of Convolutional Neural
    Networks via Self Distillation, ICCV 2019 (arXiv 1905.08094); Zhang et al.,
    Self-Distillation: Towards Efficient and Compact Neural Networks, TPAMI 2021 (journal;
    code github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final).
  """
  missing = [a for a in ("apply", "init_variables", "num_exits", "names", "feature_dim")
             if not hasattr(exits, a)]
  if missing:
    raise ValueError(f"byot: exits must be a models.exits.Exits (lacks {', '.join(missing)})")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"byot: alpha must be in [0, 1], got {alpha}")
  if not temperature > 0.0:
    raise ValueError(f"byot: temperature must be > 0, got {temperature}")
  if not feature_weight >= 0.0:
    raise ValueError(f"byot: feature_weight must be >= 0, got {feature_weight}")
  if variant not in VARIANTS:
    raise ValueError(f"byot: variant={variant!r}; allowed: {', '.join(VARIANTS)}")
  if feature_norm not in FEATURE_NORMS:
    raise ValueError(f"byot: feature_norm={feature_norm!r}; allowed: {', '.join(FEATURE_NORMS)}")
  num_exits = exits.num_exits
  if feature_exits is None:
    feature_exits = tuple(range(1, num_exits + 1))
  feature_exits = tuple(int(k) for k in feature_exits)
  if any(not 1 <= k <= num_exits for k in feature_exits):
    raise ValueError(f"byot: feature_exits must be in 1..{num_exits}, got {feature_exits}")
  if exit_optimizer is None:
    exit_optimizer = optax.sgd(0.1, momentum=0.9)
  kd_scale = temperature ** 2 if variant == "conference" else 1.0
  names = exits.names

  def init(rng=None) -> ByotState:
    variables = exits.init_variables(rng)
    return ByotState(variables["params"], variables["batch_stats"],
                     exit_optimizer.init(variables["params"]))

  def exit_losses(params, batch_stats, stage_features, teacher_probs, teacher_features, labels,
                  axis_name):
    (logits, features), updates = exits.apply(
        {"params": params, "batch_stats": batch_stats}, stage_features, train=True,
        axis_name=axis_name, mutable=["batch_stats"])
    per_example = jnp.zeros(labels.shape, jnp.float32)
    ce_sum = distill_sum = feature_sum = jnp.zeros((), jnp.float32)
    for k, (exit_logits_k, adapted) in enumerate(zip(logits, features)):
      if exit_logits_k.shape != teacher_probs.shape:
        raise ValueError(f"byot: exit logits {exit_logits_k.shape} do not match the model's "
                         f"logits {teacher_probs.shape}")
      ce = losses.cross_entropy(exit_logits_k, labels)
      distill = kd_scale * losses.soft_cross_entropy(exit_logits_k / temperature, teacher_probs)
      per_example = per_example + (1.0 - alpha) * ce + alpha * distill
      ce_sum, distill_sum = ce_sum + ce.mean(), distill_sum + distill.mean()
      if k + 1 in feature_exits:
        squared = jnp.sum(jnp.square(adapted.astype(jnp.float32) - teacher_features), axis=-1)
        feature = _feature_terms(squared, variant, feature_norm, axis_name)
        per_example = per_example + feature_weight * feature
        feature_sum = feature_sum + feature.mean()
    aux = {"logits": logits, "batch_stats": updates["batch_stats"], "ce": ce_sum,
           "distill": distill_sum, "feature": feature_sum}
    return per_example, aux

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step
    for key in ("logits", "features", "stage_features"):
      if key not in outputs:
        raise ValueError(f"byot: needs outputs[{key!r}]")
    logits, labels = outputs["logits"], batch["label"]
    stage_features = tuple(outputs["stage_features"])
    teacher_probs = jax.nn.softmax(lax.stop_gradient(logits).astype(jnp.float32) / temperature,
                                   axis=-1)
    teacher_features = lax.stop_gradient(outputs["features"]).astype(jnp.float32)
    if feature_exits and teacher_features.shape[-1] != exits.feature_dim:
      raise ValueError(f"byot: features have width {teacher_features.shape[-1]}, exits were "
                       f"built for feature_dim={exits.feature_dim}")

    # The backbone's loss: the exits with their current parameters, stage features live.
    exit_terms, aux = exit_losses(state.exit_params, state.exit_batch_stats, stage_features,
                                  teacher_probs, teacher_features, labels, axis_name)
    loss = losses.cross_entropy(logits, labels) + exit_terms

    if hooks is not None and hooks.owned_differentiated:
      # The caller differentiates the exits with the backbone and steps them (`owned`).
      new_state = state._replace(exit_batch_stats=aux["batch_stats"])
    else:
      # The exits' own step: the same terms on stop-gradient stage features.
      def step_loss(params):
        per_example, step_aux = exit_losses(params, state.exit_batch_stats,
                                            lax.stop_gradient(stage_features), teacher_probs,
                                            teacher_features, labels, axis_name)
        return jnp.mean(per_example), step_aux

      grads, aux = jax.grad(step_loss, has_aux=True)(state.exit_params)
      exit_params, opt_state = owned_params_step(exit_optimizer, state.exit_params,
                                                 state.exit_opt_state, grads, axis_name)
      new_state = ByotState(exit_params, aux["batch_stats"], opt_state)
    metrics = {f"byot_{name}_accuracy": _accuracy(z, labels)
               for name, z in zip(names, aux["logits"])}
    metrics.update(byot_exit_ce=aux["ce"], byot_distill=aux["distill"],
                   byot_feature_loss=aux["feature"])
    return loss, new_state, metrics

  def exit_logits(state, outputs):
    logits, _ = exits.apply({"params": state.exit_params, "batch_stats": state.exit_batch_stats},
                            tuple(outputs["stage_features"]), train=False)
    return dict(zip(names, logits))

  return Method(init, update, exit_logits=exit_logits, owned=owned_exits(exit_optimizer))
