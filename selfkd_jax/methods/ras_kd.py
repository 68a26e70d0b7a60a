"""RAS-KD: relation-aware label smoothing (Kim & Woo, PAKDD 2024), a reconstruction."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import (Method, check_arguments, check_state, logits_and_labels,
                                     require_outputs)

PROTOTYPE_MODES = ("ema", "aux_weights")

# Prototype sums and the auxiliary head are small matmuls whose results become targets; on
# TPU the default precision would round the features to bfloat16 first.
_HIGHEST = lax.Precision.HIGHEST


class RASKDState(NamedTuple):
  """Fixed-shape state of `ras_kd`, replicated on every device.

  Attributes:
    prototypes: `[C, d]` float32 class representative vectors `V` of mode 'ema': the EMA of
      L2-normalised features (zero rows for classes never seen). Mode 'aux_weights' reads them
      from the auxiliary classifier instead (`outputs['aux_kernel'].T`) and keeps `[C, 0]`.
    class_seen: `[C]` bool, True once a class has appeared in a training batch (any device).
  """
  prototypes: jax.Array
  class_seen: jax.Array


def ras_kd(num_classes: int, feature_dim: int, *, epsilon: float = 0.1,
           relation_temperature: float = 0.1, momentum: float = 0.9, prototypes: str = "ema",
           instance_weight: float = 0.0, temperature: float = 4.0) -> Method:
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
                + CE(g(f_i), y_i)
      g(f)    = f W_g + b_g, the auxiliary classifier (`heads.AuxClassifier`)

  Until every class has been seen in at least one training batch (so that every row of `V`
  is a representative), `q_i` falls back to uniform label smoothing over the non-target
  classes, `1 - eps` on the label and `eps / (C - 1)` elsewhere
  (`losses.smooth_labels(..., exclude_target=True)`), which is what `R` gives when all
  prototypes are equally similar. The switch is a `jnp.where` on a traced flag.

  Defaults (ours, not the paper's): m = 0.9, tau_r = 0.1, eps = 0.1, tau = 4, mu = 0 (the
  global-level term only); mu = 1 is the "+instance" variant.

  The auxiliary classifier is a head attached to the model (`heads.with_heads(backbone,
  heads.AuxClassifier(C))`), trained by the caller's optimizer through the `CE(g(f_i), y_i)`
  term of the loss; it reads stop-gradient features, so that term sends nothing to the
  backbone, and the backbone's gradient is that of `soft_ce` (and the instance term) alone.

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
    - `g` sees raw (not normalised) features and is initialised like `flax.linen.Dense`
      (LeCun-normal kernel, zero bias).

  Cost per step: O(C^2 d) for `R` (recomputed every step), one `[B, d] x [d, C]` matmul and
  its gradient for `g`, one `[C, B] x [B, d]` matmul for the prototype sums; under data
  parallelism one `psum` of `C x (d + 1)` values. The abstract claims negligible overhead:
  measure it (benchmarks/).

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

  Returns:
    A `Method`; `update` needs `outputs['logits']` `[B, C]`, `outputs['features']` `[B, d]`,
    `outputs['aux_logits']` `[B, C]` (and `outputs['aux_kernel']` `[d, C]` in 'aux_weights'
    mode), all from `heads.AuxClassifier`, and `batch['label']`. Metrics: `ras_ready` (1 once
    relation targets are used), `ras_classes_seen` (fraction), `ras_aux_loss` and
    `ras_aux_accuracy` (of `g` before the step's update, local batch).

  References:
    Kim & Woo, RAS-KD (relation-aware label smoothing for self-knowledge distillation),
    PAKDD 2024, doi 10.1007/978-981-97-2253-2_16. Reconstruction from the abstract: the full
    text is paywalled and there is no code.
  """
  check_arguments(
      "ras_kd", ("num_classes", num_classes, num_classes >= 2, ">= 2"),
      ("feature_dim", feature_dim, feature_dim >= 1, "positive"),
      ("epsilon", epsilon, 0.0 <= epsilon <= 1.0, "in [0, 1]"),
      ("relation_temperature", relation_temperature, relation_temperature > 0.0, "> 0"),
      ("temperature", temperature, temperature > 0.0, "> 0"),
      ("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1)"),
      ("instance_weight", instance_weight, instance_weight >= 0.0, ">= 0"))
  if prototypes not in PROTOTYPE_MODES:
    raise ValueError(
        f"ras_kd: unknown prototypes {prototypes!r}; allowed: {', '.join(PROTOTYPE_MODES)}")

  def init(rng=None) -> RASKDState:
    del rng
    width = feature_dim if prototypes == "ema" else 0
    return RASKDState(prototypes=jnp.zeros((num_classes, width), jnp.float32),
                      class_seen=jnp.zeros((num_classes,), bool))

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, hooks
    check_state("ras_kd", state, RASKDState)
    needed = ("features", "aux_logits") + (("aux_kernel",) if prototypes == "aux_weights" else ())
    require_outputs("ras_kd", outputs, needed,
                    "attach heads.AuxClassifier(num_classes) with heads.with_heads")
    logits, labels = logits_and_labels("ras_kd", outputs, batch, num_classes)
    aux_logits = outputs["aux_logits"]
    # Nothing built from the features (prototypes, the head's teacher logits) may send a
    # gradient to the backbone; the loss reaches the model through `logits` only.
    features = lax.stop_gradient(outputs["features"]).astype(jnp.float32)
    if features.shape[-1] != feature_dim:
      raise ValueError(
          f"ras_kd: features have width {features.shape[-1]}, expected feature_dim={feature_dim}")
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

    # Targets from the incoming state and head (see "Fixed choices" in the docstring).
    ready = jnp.all(state.class_seen)
    if prototypes == "aux_weights":
      class_vectors = outputs["aux_kernel"].T
    else:
      class_vectors = state.prototypes
    relations = losses.relation_matrix(lax.stop_gradient(class_vectors), relation_temperature)
    relation_targets = (1.0 - epsilon) * onehot + epsilon * relations[labels]
    fallback_targets = losses.smooth_labels(labels, num_classes, epsilon, exclude_target=True)
    targets = lax.stop_gradient(jnp.where(ready, relation_targets, fallback_targets))
    aux_loss = losses.cross_entropy(aux_logits, labels)  # trains the head only (sg features)
    loss = losses.soft_cross_entropy(logits, targets) + aux_loss
    if instance_weight > 0.0:
      loss = loss + instance_weight * losses.distillation_kl(
          logits, lax.stop_gradient(aux_logits), temperature)

    if prototypes == "aux_weights":
      new_prototypes = state.prototypes
      present = jnp.sum(onehot, axis=0) > 0
      if axis_name is not None:
        present = lax.psum(present.astype(jnp.int32), axis_name) > 0
    else:
      # Clamped like `torch.nn.functional.normalize` (1e-12 on the norm): a zero row stays zero.
      unit_features = features * lax.rsqrt(
          jnp.maximum(jnp.sum(jnp.square(features), axis=-1, keepdims=True), 1e-24))
      new_prototypes, present = _ema_prototypes(state, unit_features, onehot, momentum,
                                                axis_name)
    class_seen = state.class_seen | present

    aux_accuracy = jnp.mean((jnp.argmax(aux_logits, axis=-1) == labels).astype(jnp.float32))
    metrics = {
        "ras_ready": ready.astype(jnp.float32),
        "ras_classes_seen": jnp.mean(class_seen.astype(jnp.float32)),
        "ras_aux_loss": jnp.mean(aux_loss),
        "ras_aux_accuracy": aux_accuracy,
    }
    return loss, RASKDState(new_prototypes, class_seen), metrics

  return Method(init, update)


def _ema_prototypes(state, unit_features, onehot, momentum, axis_name):
  """The EMA class representatives after this batch, and which classes the batch holds."""
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
