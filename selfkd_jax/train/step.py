"""Per-device step functions with named-axis collectives over the data axis.

Each function here sees the device-local slice of the global batch and this device's shard of the
per-example tables. `parallel.py` runs the same body with `jax.shard_map` under `jax.jit` or
with `jax.pmap`. With `axis_name=None` the bodies run as plain single-device functions.

The data path, once: batch -> augment (on device, keyed by epoch and example index) ->
model.apply -> method.update -> per-example loss -> mean over the global batch -> gradients
(pmean) -> optimizer -> new params, BatchNorm statistics and method state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from selfkd_jax import adapters
from selfkd_jax.data.augment import augment_batch, normalize
from selfkd_jax.methods import Method, MethodHooks
from selfkd_jax.metrics import per_example_stats
from selfkd_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Training augmentation (`augment_batch`); the defaults of the later fields are off."""
  crop_padding: int
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_fill: int = 0
  rotation_degrees: float = 0.0
  autoaugment: str = "none"
  cutout: int = 0
  color_jitter: float = 0.0
  lighting: float = 0.0


DROPOUT_BRANCH = 2**31 - 1
# Partner images (CS-KD) are augmented from their own branch of the run key, so a partner that is
# also an anchor in the same epoch is cropped, flipped (rotated, ...) differently.
PARTNER_BRANCH = 2**31 - 2
# Padding rows of a refresh pass get this index; per-example tables drop writes beyond their end.
PADDING_INDEX = 2**31 - 1


def _pmean(x, axis_name):
  return x if axis_name is None else lax.pmean(x, axis_name)


def make_train_step(*, model, tx: optax.GradientTransformation, method: Method,
                    steps_per_epoch: int, augmentation: Augmentation,
                    model_inputs: Callable[[jax.Array], jax.Array] | None = None,
                    schedule: Callable[[jax.Array], jax.Array],
                    axis_name: str | None,
                    teacher_model=None) -> Callable[[TrainState, Any, Any], tuple]:
  """The per-device train step `(state, batch, teacher_variables) -> (state, metrics)`.

  `batch` holds this device's `image` (uint8), `label` and `index`, and for pair-sampling
  methods (CS-KD) `partner_image`, `partner_label` and `partner_index`; the method receives the
  partner images augmented and normalised like the anchors. `teacher_variables` are the frozen
  variables of `teacher_model` (an eval-mode network the method reaches through
  `hooks.teacher`), or an empty dict when the run has no network teacher. `model` is the
  backbone with the method's heads; `model_inputs(images)` is what it trains on when that is
  not the batch itself (LSSKD's rotations; the method gets the batch's B labels and indices).
  Metrics are global means (identical on every device).
  """

  def augment(images, indices, key, epoch):
    return augment_batch(images, indices, key=key, epoch=epoch,
                         crop_padding=augmentation.crop_padding, flip=augmentation.flip,
                         mean=augmentation.mean, std=augmentation.std,
                         crop_fill=augmentation.crop_fill,
                         rotation_degrees=augmentation.rotation_degrees,
                         autoaugment=augmentation.autoaugment, cutout=augmentation.cutout,
                         color_jitter=augmentation.color_jitter,
                         lighting=augmentation.lighting)

  def train_step(state: TrainState, batch, teacher_variables):
    epoch = state.step // steps_per_epoch
    images = augment(batch["image"], batch["index"], state.rng, epoch)
    if "partner_image" in batch:
      partner_key = jax.random.fold_in(state.rng, PARTNER_BRANCH)
      batch = dict(batch, partner_image=augment(batch["partner_image"], batch["partner_index"],
                                                partner_key, epoch))
    # The same adapters a user's own Linen loop uses: the frozen teacher in eval mode without
    # gradient, and a second forward pass (snapshot, partner) whose BN updates are dropped.
    teacher = (None if teacher_model is None
               else adapters.as_teacher(teacher_model, teacher_variables))
    # Epochs fold small integers into `rng` for augmentation; dropout draws from a far branch.
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, DROPOUT_BRANCH), state.step)
    forward = adapters.linen_forward(model.apply,
                                     rngs={"dropout": jax.random.fold_in(dropout_rng, 1)})

    model_images = images if model_inputs is None else model_inputs(images)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      outputs, model_updates = model.apply(variables, model_images, train=True,
                                           mutable=["batch_stats"],
                                           rngs={"dropout": dropout_rng})
      hooks = MethodHooks(forward=forward, variables=variables, images=images, teacher=teacher)
      per_example, method_state, method_metrics = method.update(
          state.method_state, outputs, batch, step=state.step, axis_name=axis_name, hooks=hooks)
      # All devices hold equal batch slices, so the mean of local means is the global mean.
      loss = jnp.mean(per_example)
      aux = (outputs, model_updates.get("batch_stats", {}), method_state, method_metrics)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    outputs, batch_stats, method_state, method_metrics = aux
    grads = _pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_size = batch["label"].shape[0]
    accuracy = jnp.mean(jnp.argmax(outputs["logits"][:batch_size], -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": accuracy.astype(jnp.float32),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               **method_metrics}
    metrics = _pmean(metrics, axis_name)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, method_state=method_state)
    return new_state, metrics

  return train_step


EXIT_PREFIX = "exit_correct/"


def make_eval_step(*, model, augmentation: Augmentation) -> Callable:
  """The per-device eval step `(state, batch) -> per-example stats` (eval mode, no augmentation).

  For a model with auxiliary exits (`outputs['exit_class_logits']`, BYOT's and LSSKD's heads),
  the stats also hold whether each exit, and the ensemble of every exit with the model's own
  classifier (mean of logits, as in BYOT's code), is right: `'exit_correct/<name>'` and
  `'exit_correct/ensemble'`.
  """

  def eval_step(state: TrainState, batch):
    images = normalize(batch["image"], augmentation.mean, augmentation.std)
    outputs = model.apply(state.variables(), images, train=False)
    stats = per_example_stats(outputs["logits"], batch["label"])
    if "exit_class_logits" in outputs:
      exit_logits = outputs["exit_class_logits"]
      all_logits = [outputs["logits"].astype(jnp.float32)]
      for name, logits in exit_logits.items():
        stats[EXIT_PREFIX + name] = jnp.argmax(logits, -1) == batch["label"]
        all_logits.append(logits.astype(jnp.float32))
      ensemble = jnp.mean(jnp.stack(all_logits), axis=0)
      stats[EXIT_PREFIX + "ensemble"] = jnp.argmax(ensemble, -1) == batch["label"]
    return stats

  return eval_step


def make_refresh_step(*, model, method: Method, augmentation: Augmentation,
                      axis_name: str | None) -> Callable:
  """The per-device step of an end-of-epoch refresh pass over the training set.

  Runs the model in eval mode on un-augmented training images and lets the method rebuild its
  state from the outputs (PS-KD's `refresh='epoch_end_eval'`).
  """

  def refresh_step(state: TrainState, batch):
    images = normalize(batch["image"], augmentation.mean, augmentation.std)
    outputs = model.apply(state.variables(), images, train=False)
    batch = dict(batch, index=jnp.where(batch["mask"] > 0, batch["index"], PADDING_INDEX))
    method_state = method.refresh(state.method_state, outputs, batch, axis_name=axis_name)
    return state.replace(method_state=method_state)

  return refresh_step
