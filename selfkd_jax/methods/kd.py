"""Hinton's knowledge distillation against any teacher that yields logits for a batch."""

from __future__ import annotations

from typing import Callable

import jax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, logits_and_labels, stateless_init

# teacher(outputs, batch, hooks) -> teacher logits [B, C] (stop-gradient is applied here).
TeacherFn = Callable[..., jax.Array]


def label_teacher(label_to_logits: Callable[[jax.Array], jax.Array]) -> TeacherFn:
  """A teacher that depends only on the label, e.g. ReffAKD's soft labels.

  `methods.kd(label_teacher(methods.soft_label_teacher(S_soft, as_logits=True)))` distils from
  the autoencoder soft labels with no trained teacher at all.
  """

  def teacher(outputs, batch, hooks):
    del outputs, hooks
    return label_to_logits(batch["label"])

  return teacher


def network_teacher() -> TeacherFn:
  """The frozen network teacher the caller supplies through `hooks.teacher`, on `hooks.images`.

  The trainer fills both from `config.teacher` (a checkpoint of this library, eval mode). With
  your own loop: `MethodHooks(images=x, teacher=lambda x: teacher_model.apply(tv, x,
  train=False))`.
  """

  def teacher(outputs, batch, hooks):
    del outputs, batch
    if hooks is None or hooks.teacher is None or hooks.images is None:
      raise ValueError("network_teacher needs hooks.teacher and hooks.images (a frozen teacher "
                       "network and the batch's images): in your own loop pass "
                       "hooks=adapters.linen_hooks(..., teacher=adapters.as_teacher(...)) or "
                       "adapters.nnx_hooks(..., teacher=...); the trainer supplies them when "
                       "the config has config.teacher")
    return hooks.teacher(hooks.images)["logits"]

  return teacher


def kd(teacher: TeacherFn, *, alpha: float = 0.9, temperature: float = 4.0) -> Method:
  """Knowledge distillation (Hinton et al.). Stateless.

      L = (1 - alpha) CE(z, y) + alpha T^2 KL(softmax(z_t / T) || softmax(z / T))

  with `z_t = sg(teacher(outputs, batch, hooks))`. The teacher is a function, so any source
  of teacher logits fits: a label-only pseudo-teacher (`label_teacher`, e.g. ReffAKD's soft
  labels as `log S_soft[y]`), or a frozen network run through `hooks.forward`.

  Args:
    teacher: `teacher(outputs, batch, hooks) -> [B, C]` teacher logits.
    alpha: weight of the distillation term, in [0, 1]. Default 0.9.
    temperature: `T > 0`. Default 4.

  References:
    Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"kd: alpha must be in [0, 1], got {alpha}")
  if temperature <= 0:
    raise ValueError(f"kd: temperature must be > 0, got {temperature}")

  return _teacher_distillation(teacher, "kd", ce_weight=1.0 - alpha,
                               kl_weight=lambda num_classes: alpha, temperature=temperature)


def _teacher_distillation(teacher: TeacherFn, name: str, *, ce_weight: float,
                          kl_weight: Callable[[int], float], temperature: float) -> Method:
  """`ce_weight CE(z, y) + kl_weight(C) T^2 KL(softmax(z_t / T) || softmax(z / T))`."""

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name
    logits, labels = logits_and_labels(name, outputs, batch)
    teacher_logits = jax.lax.stop_gradient(teacher(outputs, batch, hooks))
    distill = losses.distillation_kl(logits, teacher_logits, temperature)
    loss = (ce_weight * losses.cross_entropy(logits, labels)
            + kl_weight(logits.shape[-1]) * distill)
    return loss, state, {f"{name}_distill": distill.mean()}

  return Method(stateless_init, update)


TFKD_SELF_VARIANTS = ("faithful", "paper")


def tfkd_self(teacher: TeacherFn, *, alpha: float = 0.95, temperature: float = 6.0,
              multiplier: float = 50.0, variant: str = "faithful") -> Method:
  """Tf-KD_self: KD from a teacher of the same architecture trained first with plain CE. Stateless.

  faithful (the official code, `loss_kd_self` in yuanli2333/Teacher-free-Knowledge-Distillation
  `my_loss_function.py`): PyTorch's `KLDivLoss()` averages over B·C, which the per-example form
  folds into the weight, and a multiplier `m` rescales the term:

      L = (1 - alpha) CE(z, y) + alpha (m / C) T^2 KL(softmax(z_t / T) || softmax(z / T))

  paper: the plain KD form, `(1 - alpha) CE + alpha T^2 KL(...)` (no m / C).

  The teacher is any `TeacherFn`; the trainer passes `network_teacher()` with the CE checkpoint
  named by `config.teacher`, run in eval mode on the student's augmented batch.

  Args:
    teacher: `teacher(outputs, batch, hooks) -> [B, C]` teacher logits.
    alpha: weight of the distillation term, in [0, 1]. Default 0.95 (ResNet-18, CIFAR-100).
    temperature: `T > 0`. Default 6.
    multiplier: `m > 0` (faithful only). Default 50.
    variant: 'faithful' or 'paper'.

  References:
    Yuan, Tay, Li, Wang, Feng. Revisiting Knowledge Distillation via Label Smoothing
    Regularization. CVPR 2020, arXiv 1909.11723.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"tfkd_self: alpha must be in [0, 1], got {alpha}")
  if temperature <= 0 or multiplier <= 0:
    raise ValueError(f"tfkd_self: temperature and multiplier must be > 0, got {temperature}, "
                     f"{multiplier}")
  if variant not in TFKD_SELF_VARIANTS:
    raise ValueError(f"tfkd_self: variant={variant!r}; allowed: {', '.join(TFKD_SELF_VARIANTS)}")

  def kl_weight(num_classes):  # faithful: KLDivLoss's mean over B·C, rescaled by m
    return alpha * (multiplier / num_classes if variant == "faithful" else 1.0)

  return _teacher_distillation(teacher, "tfkd_self", ce_weight=1.0 - alpha, kl_weight=kl_weight,
                               temperature=temperature)
