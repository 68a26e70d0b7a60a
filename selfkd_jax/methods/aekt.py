"""AEKT: adaptive explicit knowledge transfer (reconstruction), DKD with an adaptive TCKD weight
and a task-serialization head."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method
from selfkd_jax.methods.dkd import check_weights, warmup_factor
from selfkd_jax.methods.kd import TeacherFn
from selfkd_jax.methods.owned_params import owned_params_step

WEIGHT_FUNCTIONS = ("ratio", "constant")


class AEKTState(NamedTuple):
  """The task-serialization head `h(z) = z W + b` (`W` [C, C] from the identity, `b` zeros) and
  the state of the optimizer that trains it. Empty dicts when the head is off."""
  head_params: dict[str, jax.Array]
  head_opt_state: Any


def _serialize(head_params, logits):
  if not head_params:
    return logits
  return (jnp.dot(logits.astype(jnp.float32), head_params["kernel"],
                  precision=lax.Precision.HIGHEST) + head_params["bias"])


def _target_prob(logits, labels, temperature):
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]


def aekt(teacher: TeacherFn, num_classes: int, *, steps_per_epoch: int | None = None,
         alpha: float = 1.0, beta: float = 8.0,
         temperature: float = 4.0, warmup_epochs: float = 20.0, weight_fn: str = "ratio",
         max_weight: float = 1.0, serialization_head: bool = True,
         head_optimizer: optax.GradientTransformation | None = None) -> Method:
  r"""Adaptive explicit knowledge transfer (AEKT) — a **reconstruction**.

  The paper (arXiv 2409.01679) builds on DKD; its code is not public and the text gives the
  idea, not every detail. What is implemented, with every free choice a knob:

  - implicit knowledge: DKD's NCKD (the non-target distribution), weight `beta`;
  - explicit knowledge: DKD's TCKD (the binary target/non-target split), weighted per example
    by the adaptive `w = clip(sg(p_t[y] / p_s[y]), 0, max_weight)` (probabilities at `T`, `p_s`
    from the classifier's logits `z`; `weight_fn='ratio'`), or `w = 1`
    (`weight_fn='constant'`, i.e. plain DKD on the head);
  - task serialization: a C×C linear head `h` (identity-initialised, so it starts as a no-op)
    after the classifier receives the distillation terms while CE acts on the classifier's own
    logits `z`, so the two tasks do not pull one output in two directions:

        L = CE(z, y) + min((e + 1) / warmup, 1) (alpha w TCKD(h(z), z_t) + beta NCKD(h(z), z_t))

    Gradients reach the backbone through `h(z)`; the head itself is trained by the method (its
    distillation gradient, averaged over devices, through `head_optimizer`) and lives in the
    method state, so the model has no extra parameters and evaluation uses `z` alone.
    `serialization_head=False` distils on `z` directly.

  Defaults `alpha`, `beta`, `T`, warm-up are DKD's CIFAR values; `max_weight = 1` (the weight
  only ever lowers TCKD) and the identity initialisation are ours. Measured on Fashion-MNIST
  (LeNet-5-BN, beta 1, 6 epochs of 8192 images): with `max_weight = 4` the head and the
  amplified TCKD collapsed training to chance in epoch 2; with 1, or without the head, or with
  `weight_fn='constant'`, it trained to 84-86%.

  Args:
    teacher: `teacher(outputs, batch, hooks) -> [B, C]` teacher logits (a checkpoint through
      `kd.network_teacher()`, or ReffAKD soft labels as `log S_soft[y]`).
    num_classes: C (the head's size).
    steps_per_epoch, alpha, beta, temperature, warmup_epochs: as in `dkd`.
    weight_fn: 'ratio' (adaptive, default) or 'constant'.
    max_weight: upper clip of the adaptive weight (> 0).
    serialization_head: use the task-serialization head (default True).
    head_optimizer: trains the head; default `optax.sgd(0.05, momentum=0.9)`. The trainer
      passes one built from the run's optimizer config.

  Returns:
    A `Method` whose state is an `AEKTState`. Metrics: `aekt_distill`, `aekt_weight` (mean w),
    `aekt_warmup`.

  References:
    AEKT, arXiv 2409.01679. Zhao et al., Decoupled Knowledge Distillation, arXiv 2203.08679.
  """
  check_weights("aekt", alpha, beta, temperature, warmup_epochs, steps_per_epoch)
  if weight_fn not in WEIGHT_FUNCTIONS:
    raise ValueError(f"aekt: weight_fn={weight_fn!r}; allowed: {', '.join(WEIGHT_FUNCTIONS)}")
  if max_weight <= 0:
    raise ValueError(f"aekt: max_weight must be > 0, got {max_weight}")
  if head_optimizer is None:
    head_optimizer = optax.sgd(0.05, momentum=0.9)

  def init(rng=None):
    del rng
    if not serialization_head:
      return AEKTState({}, {})
    params = {"kernel": jnp.eye(num_classes, dtype=jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    return AEKTState(params, head_optimizer.init(params))

  def distillation(head_params, logits, teacher_logits, labels, warmup):
    serialized = _serialize(head_params, logits)
    if weight_fn == "ratio":
      # p_s from the classifier (the student's own prediction, what inference uses), not from
      # the head: weighing by the head's p_s lets the head and the weight feed each other
      # (measured: collapse to chance within 2 epochs on Fashion-MNIST).
      ratio = (_target_prob(teacher_logits, labels, temperature)
               / _target_prob(logits, labels, temperature))
      weight = jnp.clip(lax.stop_gradient(ratio), 0.0, max_weight)
    else:
      weight = jnp.ones(labels.shape, jnp.float32)
    per_example = warmup * losses.dkd_loss(serialized, teacher_logits, labels,
                                           alpha=alpha * weight, beta=beta,
                                           temperature=temperature)
    return per_example, weight

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    logits, labels = outputs["logits"], batch["label"]
    teacher_logits = lax.stop_gradient(teacher(outputs, batch, hooks))
    warmup = warmup_factor(step, steps_per_epoch, warmup_epochs)
    distill, weight = distillation(state.head_params, logits, teacher_logits, labels, warmup)
    new_state = state
    if serialization_head:
      # The head's own step: the same terms, with the classifier's logits held fixed.
      def head_loss(params):
        return jnp.mean(distillation(params, lax.stop_gradient(logits), teacher_logits,
                                     labels, warmup)[0])

      grads = jax.grad(head_loss)(state.head_params)
      new_state = AEKTState(*owned_params_step(head_optimizer, state.head_params,
                                               state.head_opt_state, grads, axis_name))
    loss = losses.cross_entropy(logits, labels) + distill
    return loss, new_state, {"aekt_distill": distill.mean(), "aekt_weight": weight.mean(),
                             "aekt_warmup": warmup}

  return Method(init, update)
