"""Hinton's knowledge distillation against any teacher that yields logits for a batch."""

from __future__ import annotations

from typing import Callable

import jax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, stateless_init

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

  def update(state, outputs, batch, *, step, epoch, axis_name=None, hooks=None):
    del step, epoch, axis_name
    logits, labels = outputs["logits"], batch["label"]
    teacher_logits = jax.lax.stop_gradient(teacher(outputs, batch, hooks))
    distill = losses.distillation_kl(logits, teacher_logits, temperature)
    loss = (1.0 - alpha) * losses.cross_entropy(logits, labels) + alpha * distill
    return loss, state, {"kd_distill": distill.mean()}

  return Method(stateless_init, update)
