"""DKD: decoupled knowledge distillation from any teacher, with mdistiller's epoch warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfkd_jax import losses
from selfkd_jax.methods.base import (Method, check_steps_per_epoch, epoch_of_step,
                                     logits_and_labels, stateless_init)
from selfkd_jax.methods.kd import TeacherFn


def warmup_factor(step: jax.Array, steps_per_epoch: int | None, warmup_epochs: float
                  ) -> jax.Array:
  """`min((e + 1) / warmup, 1)` with `e = step // steps_per_epoch` the 0-indexed epoch of the
  0-based optimizer `step`; 1 when `warmup_epochs` is 0.

  mdistiller counts epochs from 1 and scales the DKD loss by `min(epoch / warmup, 1)`, so its
  first epoch already has weight 1/warmup; with 0-indexed epochs that is `(e + 1) / warmup`.
  """
  if warmup_epochs <= 0:
    return jnp.ones((), jnp.float32)
  epoch = epoch_of_step(step, steps_per_epoch)
  return jnp.minimum((epoch.astype(jnp.float32) + 1.0) / warmup_epochs, 1.0)


def check_weights(name, alpha, beta, temperature, warmup_epochs, steps_per_epoch):
  if alpha < 0 or beta < 0:
    raise ValueError(f"{name}: alpha and beta must be >= 0, got {alpha}, {beta}")
  if temperature <= 0:
    raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
  if warmup_epochs < 0:
    raise ValueError(f"{name}: warmup_epochs must be >= 0 (0 = none), got {warmup_epochs}")
  if warmup_epochs > 0:
    check_steps_per_epoch(name, steps_per_epoch, f"the warm-up (warmup_epochs={warmup_epochs})")


def dkd(teacher: TeacherFn, *, steps_per_epoch: int | None = None, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 20.0,
        ce_weight: float = 1.0) -> Method:
  """Decoupled knowledge distillation (Zhao et al. 2022). Stateless.

      L = ce_weight CE(z, y) + min((e + 1) / warmup, 1) (alpha TCKD + beta NCKD)

  with TCKD and NCKD from `losses.dkd_loss` (binary target/non-target KL and the KL over the
  non-target classes, both at temperature T and times T^2) against `z_t = sg(teacher(...))`.
  Faithful to megvii-research/mdistiller `distillers/DKD.py` and its trainer (epochs counted
  from 1, so the first epoch has weight 1/warmup; see `warmup_factor`).

  Args:
    teacher: `teacher(outputs, batch, hooks) -> [B, C]` teacher logits (`kd.network_teacher()`
      for a checkpoint, `kd.label_teacher(...)` for ReffAKD soft labels).
    steps_per_epoch: optimizer steps per epoch: the warm-up follows the epoch of `update`'s
      0-based `step`. Required unless `warmup_epochs` is 0.
    alpha: TCKD weight. Default 1 (mdistiller CIFAR-100).
    beta: NCKD weight. Default 8 (mdistiller CIFAR-100, ResNet32x4 -> ResNet8x4).
    temperature: `T > 0`. Default 4.
    warmup_epochs: epochs of linear warm-up of the distillation terms; 0 = none. Default 20.
    ce_weight: weight of the CE term. Default 1.

  References:
    Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022, arXiv 2203.08679.
  """
  check_weights("dkd", alpha, beta, temperature, warmup_epochs, steps_per_epoch)

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del axis_name
    logits, labels = logits_and_labels("dkd", outputs, batch)
    teacher_logits = jax.lax.stop_gradient(teacher(outputs, batch, hooks))
    distill = losses.dkd_loss(logits, teacher_logits, labels, alpha=alpha, beta=beta,
                              temperature=temperature)
    warmup = warmup_factor(step, steps_per_epoch, warmup_epochs)
    loss = ce_weight * losses.cross_entropy(logits, labels) + warmup * distill
    return loss, state, {"dkd_distill": distill.mean(), "dkd_warmup": warmup}

  return Method(stateless_init, update)
