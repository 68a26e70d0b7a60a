"""PS-KD: progressive self-knowledge distillation (Kim et al., ICCV 2021)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from selfkd_jax import losses
from selfkd_jax.methods.base import (Method, check_state, check_steps_per_epoch, checked_indices,
                                     checked_logits, epoch_of_step, logits_and_labels)
from selfkd_jax.methods.per_example import (PerExampleTable, create_table, first_visit_one_hot,
                                            gather_rows, scatter_rows, written_rows)

REFRESH_MODES = ("step", "epoch_end_eval")


class PSKDState(NamedTuple):
  """`past_predictions[i]`: the last softmax prediction of training example `i`."""
  past_predictions: PerExampleTable


def pskd(num_examples: int, num_classes: int, total_epochs: int, *, steps_per_epoch: int,
         alpha_T: float = 0.8, refresh: str = "step", storage_dtype: Any = jnp.float32
         ) -> Method:
  """Progressive self-knowledge distillation.

  The model's own past predictions become a growing share of its targets:

      e       = step // steps_per_epoch                  (0-indexed epoch of the 0-based step)
      alpha_e = alpha_T * min(e + 1, E) / E
      q_i     = (1 - alpha_e) * onehot(y_i) + alpha_e * sg(P[i])
      L_i     = -sum_k q_ik log softmax(z_i)_k

  `P[i]` is example `i`'s last recorded prediction (from the previous epoch). On an example's
  first visit its row has never been written, and the target is exactly one-hot, as in the
  official code's epoch 0 (it writes one-hot rows into `P` before using them): the table itself
  says so (a written row is a probability vector, an unwritten one is zero), not an epoch number,
  so a sampler that skips an example in epoch 0 cannot mix zeros into its target. Past the
  schedule's last epoch alpha stays at `alpha_T`.

  Variants (`refresh`):
    'step' (faithful, default): after each step `P[i] <- softmax(z_i)` from the same forward
      pass (train mode, augmented input), as in the official code.
    'epoch_end_eval' (the paper's intent): steps leave `P` alone; at the end of every epoch the
      trainer runs a clean eval-mode pass over the training set and calls `refresh`, which writes
      `P[i] <- softmax(z_i)` from it. Costs one extra inference pass over the data per epoch.

  The paper writes `alpha_t = alpha_T * t / T` with 1-indexed epochs `t`; the official code's
  `(e + 1) / E` with 0-indexed `e` is the same schedule.

  State: `P` of `num_examples x num_classes` in `storage_dtype` (fp32 default; bf16 halves it;
  `state.past_predictions.values()` reads it, since bf16 rows are stored as their bits).
  Under data parallelism (`axis_name` given) `P` is sharded by rows; see `per_example`.

  Args:
    num_examples: size of the training set (dataset indices are `0..num_examples-1`).
    num_classes: number of classes.
    total_epochs: `E`, the length of the schedule.
    steps_per_epoch: optimizer steps per epoch: `update`'s 0-based `step` gives the epoch.
    alpha_T: the final share of past predictions, in [0, 1]. Default 0.8.
    refresh: 'step' or 'epoch_end_eval'.
    storage_dtype: dtype of `P`.

  Returns:
    A `Method`; `update` needs `batch['label']` and `batch['index']` (`0..num_examples-1`).
    Metrics: `pskd_alpha`, and `pskd_seen`, the share of the batch's examples whose past
    prediction has been recorded: 0 in the first epoch, then 1. With `refresh='epoch_end_eval'`
    rows are written only by `method.refresh`, which your loop must call over the training set
    at every epoch's end (the trainer does); without it `pskd_seen` stays 0 and the targets
    stay one-hot, i.e. plain cross-entropy.

  References:
    Kim, Ji, Yoon, Hwang. Self-Knowledge Distillation with Progressive Refinement of Targets.
    ICCV 2021. arXiv:2006.12000. Official code: lgcnsai/PS-KD-Pytorch.
  """
  if not 0.0 <= alpha_T <= 1.0:
    raise ValueError(f"pskd: alpha_T must be in [0, 1], got {alpha_T}")
  if total_epochs <= 0:
    raise ValueError(f"pskd: total_epochs must be positive, got {total_epochs}")
  check_steps_per_epoch("pskd", steps_per_epoch, "the alpha schedule")
  if refresh not in REFRESH_MODES:
    raise ValueError(f"pskd: unknown refresh {refresh!r}; allowed: {', '.join(REFRESH_MODES)}")

  def init(rng=None) -> PSKDState:
    del rng
    return PSKDState(create_table(num_examples, (num_classes,), storage_dtype))

  def write_predictions(state, logits, indices, axis_name, after=None):
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return PSKDState(scatter_rows(state.past_predictions, indices, probs, axis_name,
                                  after=after))

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del hooks
    check_state("pskd", state, PSKDState)
    logits, labels = logits_and_labels("pskd", outputs, batch, num_classes)
    indices = checked_indices("pskd", batch, labels.shape)
    alpha = losses.pskd_alpha(epoch_of_step(step, steps_per_epoch), total_epochs, alpha_T)
    past = gather_rows(state.past_predictions, indices, axis_name).astype(jnp.float32)
    seen = written_rows(past)
    past = first_visit_one_hot(past, labels, num_classes)
    loss = losses.soft_cross_entropy(logits, losses.pskd_targets(labels, past, alpha))
    if refresh == "step":
      state = write_predictions(state, logits, indices, axis_name, after=past)
    return loss, state, {"pskd_alpha": jnp.asarray(alpha, jnp.float32),
                         "pskd_seen": jnp.mean(seen.astype(jnp.float32))}

  def refresh_from_eval(state, outputs, batch, *, axis_name=None):
    check_state("pskd", state, PSKDState)
    logits = checked_logits("pskd", outputs, num_classes)
    return write_predictions(state, logits, checked_indices("pskd", batch, logits.shape[:-1]),
                             axis_name)

  return Method(init, update, refresh_from_eval if refresh == "epoch_end_eval" else None)
