"""RAS-KD: relation-aware label smoothing (Kim & Woo, PAKDD 2024), a reconstruction."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method
from selfkd_jax.methods.owned_params import owned_params_step

PROTOTYPE_MODES = ("ema", "aux_weights")

# Prototype sums and the auxiliary head are small matmuls whose results become targets; on
# TPU the default precision would round the features to bfloat16 first.
_HIGHEST = lax.Precision.HIGHEST


class RASKDState(NamedTuple):
  """Fixed-shape state of `ras_kd`, replicated on every device.

  Attributes:
    prototypes: `[C, d]` float32 class representative vectors `V`. Mode 'ema': the EMA of
      L2-normalised features (zero rows for classes never seen). Mode 'aux_weights': a copy of
      `aux_params['kernel'].T`, refreshed by every update (the kernel is what the targets use).
    class_seen: `[C]` bool, True once a class has appeared in a training batch (any device).
    aux_params: the auxiliary linear classifier `{'kernel': [d, C], 'bias': [C]}`, float32.
    aux_opt_state: the state of `aux_optimizer` for `aux_params`.
  """
  prototypes: jax.Array
  class_seen: jax.Array
  aux_params: dict[str, jax.Array]
  aux_opt_state: Any


def _aux_logits(params, features):
  return jnp.dot(features, params["kernel"], precision=_HIGHEST) + params["bias"]


def ras_kd(num_classes: int, feature_dim: int, *, epsilon: float = 0.1,
           relation_temperature: float = 0.1, momentum: float = 0.9, prototypes: str = "ema",
           instance_weight: float = 0.0, temperature: float = 4.0,
           aux_optimizer: optax.GradientTransformation | None = None) -> Method:
  r"""Relation-aware label smoothing with a light auxiliary classifier (RAS-KD).

  **Reconstruction.** The paper is paywalled and no code is public; everything below is our
  reading of the abstract (see `docs/METHODS.md`). The free choices that plausibly matter
  are knobs (arguments below); the remaining ones are fixed and listed under "Fixed choices"
  with the reason. Do not report results as the paper's method without
  saying so.

  Per step, with features `f_i = sg(outputs['features'][i])`, logits `z_i`, labels `y_i`:

      V (class representatives, [C, d]):
        'ema':          V[c] <- m V[c] + (1 - m) mean_{i: y_i = c} f_i / ||f_i||
        'aux_weights':  V = sg(W_g^T), the auxiliary classifier's weight rows
      R[c, j] = softmax_{j != c}(cos(V_c, V_j) / tau_r),  R[c, c] = 0    (losses.relation_matrix)
      q_i     = (1 - eps) e_{y_i} + eps R[y_i]
      L_i     = soft_ce(z_i, q_i) + mu * tau^2 KL(softmax(sg(g(f_i))/tau) || softmax(z_i/tau))
      g(f)    = f W_g + b_g, trained by this method with CE on (f_i, y_i)

  Until every class has been seen in at least one training batch (so that every row of `V`
  is a representative), `q_i` falls back to uniform label smoothing over the non-target
  classes, `1 - eps` on the label and `eps / (C - 1)` elsewhere
  (`losses.smooth_labels(..., exclude_target=True)`), which is what `R` gives when all
  prototypes are equally similar. The switch is a `jnp.where` on a traced flag.

  Defaults (ours, not the paper's): m = 0.9, tau_r = 0.1, eps = 0.1, tau = 4, mu = 0 (the
  global-level term only); mu = 1 is the "+instance" variant.

  Why the auxiliary head lives in the method state: it reads stop-gradient features, so its
  gradient does not depend on the backbone and the backbone receives nothing from its CE.
  Training it here (`jax.grad` of its mean CE inside `update`, `pmean` over `axis_name`, one
  `aux_optimizer` step) means the model needs no extra parameters and a user's own train loop
  needs no second optimizer: the head is carried, checkpointed and sharded (replicated) like
  any other method state. The outer `jax.value_and_grad` over model parameters sees only
  `soft_ce` (and the instance term) through `z`.

  Fixed choices where the abstract is silent (not knobs):
    - First observation of a class in 'ema' mode: `V[c]` is set to that batch's class mean
      (the usual "start the average at the first value" convention) instead of decaying from
      the zero initialisation. Only directions enter `R`, so the first direction is the same
      either way; the difference is that here the first batch then fades like any EMA history
      (weight `m^k` after `k` more observations, instead of `(1 - m) m^k`), and the rows stay
      at the scale of a mean of unit vectors. Classes absent from the global batch keep their
      row. Rows are not re-normalised (`relation_matrix` normalises them).
    - The targets of a step use the state at the start of the step (`V` and `g` before this
      step's update), like PS-KD's past predictions: the target does not depend on which other
      examples share the batch, one forward of `g` serves both its CE gradient and the
      instance term, and both prototype modes behave alike. So the fallback lasts until the
      step after the last class is first seen.
    - Readiness is the same "every class seen" flag in 'aux_weights' mode (the rows of `W_g`
      exist from initialisation but are random until the class has been trained on).
    - The instance term uses `g`'s logits before this step's update (one forward) and is not
      gated by readiness (an untrained `g` gives near-uniform teacher probabilities at tau = 4,
      i.e. mild smoothing).
    - `g` sees raw (not normalised) features; its CE is the mean over the local batch, and
      the `pmean` of the gradients over devices is the gradient of the global-batch mean.
    - `g` is initialised like `flax.linen.Dense`: LeCun-normal kernel from the `rng` given to
      `init` (PRNGKey(0) when none), zero bias.

  Cost per step: O(C^2 d) for `R` (recomputed every step), one `[B, d] x [d, C]` matmul and
  its gradient for `g`, one `[C, B] x [B, d]` matmul for the prototype sums; under data
  parallelism one `psum` of `C x (d + 1)` values and one `pmean` of `g`'s `(d + 1) C`
  gradients. The abstract claims negligible overhead: measure it (benchmarks/).

  State: `RASKDState` (all arrays, fixed shapes; replicated, never sharded).

  Args:
    num_classes: `C >= 2`.
    feature_dim: `d`, the width of `outputs['features']`.
    epsilon: smoothing mass `eps` in [0, 1]. Default 0.1.
    relation_temperature: `tau_r > 0` of the relation softmax. Default 0.1.
    momentum: EMA momentum `m` in [0, 1) ('ema' mode). Default 0.9.
    prototypes: 'ema' (default) or 'aux_weights'.
    instance_weight: `mu >= 0` of the instance-level distillation term. Default 0.
    temperature: `tau > 0` of the instance-level term. Default 4.
    aux_optimizer: optax transformation training `g`; default `optax.sgd(0.1, momentum=0.9)`
      (the usual CIFAR recipe for a classifier head). A trainer may pass one built from its
      run's optimizer config.

  Returns:
    A `Method`; `update` needs `outputs['logits']` `[B, C]`, `outputs['features']` `[B, d]`
    and `batch['label']`. Metrics: `ras_ready` (1 once relation targets are used),
    `ras_classes_seen` (fraction), `ras_aux_loss` and `ras_aux_accuracy` (of `g` before the
    step's update, local batch).

  References:
    Kim & Woo, RAS-KD (relation-aware label smoothing for self-knowledge distillation),
    PAKDD 2024, doi 10.1007/978-981-97-2253-2_16. Reconstruction from the abstract: the full
    text is paywalled and there is no code.
  """
  if num_classes < 2:
    raise ValueError(f"ras_kd: num_classes must be >= 2, got {num_classes}")
  if feature_dim < 1:
    raise ValueError(f"ras_kd: feature_dim must be positive, got {feature_dim}")
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"ras_kd: epsilon must be in [0, 1], got {epsilon}")
  if not relation_temperature > 0.0:
    raise ValueError(f"ras_kd: relation_temperature must be > 0, got {relation_temperature}")
  if not temperature > 0.0:
    raise ValueError(f"ras_kd: temperature must be > 0, got {temperature}")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"ras_kd: momentum must be in [0, 1), got {momentum}")
  if not instance_weight >= 0.0:
    raise ValueError(f"ras_kd: instance_weight must be >= 0, got {instance_weight}")
  if prototypes not in PROTOTYPE_MODES:
    raise ValueError(
        f"ras_kd: unknown prototypes {prototypes!r}; allowed: {', '.join(PROTOTYPE_MODES)}")
  if aux_optimizer is None:
    aux_optimizer = optax.sgd(0.1, momentum=0.9)

  def init(rng=None) -> RASKDState:
    if rng is None:
      rng = jax.random.PRNGKey(0)
    kernel = jax.nn.initializers.lecun_normal()(rng, (feature_dim, num_classes), jnp.float32)
    aux_params = {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
    if prototypes == "aux_weights":
      prototype_rows = kernel.T
    else:
      prototype_rows = jnp.zeros((num_classes, feature_dim), jnp.float32)
    return RASKDState(prototypes=prototype_rows,
                      class_seen=jnp.zeros((num_classes,), bool),
                      aux_params=aux_params,
                      aux_opt_state=aux_optimizer.init(aux_params))

  def ema_prototypes(state, unit_features, onehot, axis_name):
    sums = jnp.einsum("bc,bd->cd", onehot, unit_features, precision=_HIGHEST)
    counts = jnp.sum(onehot, axis=0)
    if axis_name is not None:
      # Every device must hold the same V, so the statistics are those of the global batch.
      sums, counts = lax.psum((sums, counts), axis_name)
    present = counts > 0
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    decayed = momentum * state.prototypes + (1.0 - momentum) * means
    updated = jnp.where(state.class_seen[:, None], decayed, means)
    return jnp.where(present[:, None], updated, state.prototypes), present

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, hooks
    if "features" not in outputs:
      raise ValueError("ras_kd: needs outputs['features'] (the penultimate features, [B, d])")
    logits, labels = outputs["logits"], batch["label"]
    # Nothing built from the features (prototypes, the head, its teacher logits) may send a
    # gradient to the backbone; the loss reaches the model through `logits` only.
    features = lax.stop_gradient(outputs["features"]).astype(jnp.float32)
    if features.shape[-1] != feature_dim:
      raise ValueError(
          f"ras_kd: features have width {features.shape[-1]}, expected feature_dim={feature_dim}")
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

    # Targets from the incoming state (see "Choices" in the docstring).
    ready = jnp.all(state.class_seen)
    if prototypes == "aux_weights":
      class_vectors = state.aux_params["kernel"].T
    else:
      class_vectors = state.prototypes
    relations = losses.relation_matrix(lax.stop_gradient(class_vectors), relation_temperature)
    relation_targets = (1.0 - epsilon) * onehot + epsilon * relations[labels]
    fallback_targets = losses.smooth_labels(labels, num_classes, epsilon, exclude_target=True)
    targets = lax.stop_gradient(jnp.where(ready, relation_targets, fallback_targets))
    loss = losses.soft_cross_entropy(logits, targets)

    # The auxiliary head: one forward gives its CE gradient and the instance-level teacher.
    def aux_loss_fn(params):
      aux_logits = _aux_logits(params, features)
      return jnp.mean(losses.cross_entropy(aux_logits, labels)), aux_logits

    (aux_loss, aux_logits), aux_grads = jax.value_and_grad(aux_loss_fn, has_aux=True)(
        state.aux_params)
    aux_params, aux_opt_state = owned_params_step(aux_optimizer, state.aux_params,
                                                  state.aux_opt_state, aux_grads, axis_name)

    if instance_weight > 0.0:
      loss = loss + instance_weight * losses.distillation_kl(
          logits, lax.stop_gradient(aux_logits), temperature)

    if prototypes == "aux_weights":
      new_prototypes = aux_params["kernel"].T
      present = jnp.sum(onehot, axis=0) > 0
      if axis_name is not None:
        present = lax.psum(present.astype(jnp.int32), axis_name) > 0
    else:
      # Clamped like `torch.nn.functional.normalize` (1e-12 on the norm): a zero row stays zero.
      unit_features = features * lax.rsqrt(
          jnp.maximum(jnp.sum(jnp.square(features), axis=-1, keepdims=True), 1e-24))
      new_prototypes, present = ema_prototypes(state, unit_features, onehot, axis_name)
    class_seen = state.class_seen | present

    new_state = RASKDState(prototypes=new_prototypes, class_seen=class_seen,
                           aux_params=aux_params, aux_opt_state=aux_opt_state)
    aux_accuracy = jnp.mean((jnp.argmax(aux_logits, axis=-1) == labels).astype(jnp.float32))
    metrics = {
        "ras_ready": ready.astype(jnp.float32),
        "ras_classes_seen": jnp.mean(class_seen.astype(jnp.float32)),
        "ras_aux_loss": aux_loss,
        "ras_aux_accuracy": aux_accuracy,
    }
    return loss, new_state, metrics

  return Method(init, update)
