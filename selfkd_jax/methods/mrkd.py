"""MrKD: memory-replay knowledge distillation from earlier snapshots of the model itself."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, PyTree, check_arguments, check_state, logits_and_labels

TC_MODES = ("mix", "swap")
TC_WHEN = ("always", "wrong")


class MrKDState(NamedTuple):
  """Fixed-shape state of `mrkd`, replicated on every device.

  Attributes:
    snapshots: the model variables (same tree as `variables_template`) with a leading `[K]` axis
      on every leaf: a ring buffer of the last `K` snapshots. Slot `k` holds a snapshot iff
      `k < num_filled` (slots fill in order 0, 1, ..., K-1, then wrap); empty slots are zeros.
    num_filled: int32 scalar, how many slots hold a snapshot (`0..K`).
    next_slot: int32 scalar, the slot the next snapshot is written to.
  """
  snapshots: PyTree
  num_filled: jax.Array
  next_slot: jax.Array


def _tempered_average(snapshots, num_filled, forward, images, num_classes, temperature):
  """Mean over the filled slots of `softmax(f(x; theta_k) / T)`; uniform while none is filled.

  `lax.map` runs the K forwards one after another (one compiled body, one forward's memory);
  the `cond` skips the forward of an empty slot at run time.
  """
  batch_size = images.shape[0]

  def one(args):
    k, variables = args

    def run(v):
      logits = forward(v, images, train=False)["logits"].astype(jnp.float32)
      return jax.nn.softmax(logits / temperature, axis=-1)

    def empty(v):
      del v
      return jnp.zeros((batch_size, num_classes), jnp.float32)

    return lax.cond(k < num_filled, run, empty, variables)

  num_slots = jax.tree.leaves(snapshots)[0].shape[0]
  probs = lax.map(one, (jnp.arange(num_slots), snapshots))  # [K, B, C]
  filled = (jnp.arange(num_slots) < num_filled)[:, None, None]
  total = jnp.sum(jnp.where(filled, probs, 0.0), axis=0)
  uniform = jnp.full_like(total, 1.0 / num_classes)
  return jnp.where(num_filled > 0, total / jnp.maximum(num_filled, 1).astype(jnp.float32),
                   uniform)


def _teacher_correction(q, labels, mode, beta, when):
  """TC on the tempered teacher probabilities `q` [B, C]."""
  num_classes = q.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=q.dtype)
  top = jnp.argmax(q, axis=-1)
  if mode == "mix":
    corrected = beta * onehot + (1.0 - beta) * q
  else:  # 'swap': exchange the largest entry with the label's (a no-op when they coincide)
    q_top = jnp.take_along_axis(q, top[:, None], axis=-1)
    q_label = jnp.take_along_axis(q, labels[:, None], axis=-1)
    top_onehot = jax.nn.one_hot(top, num_classes, dtype=q.dtype)
    corrected = q + (q_label - q_top) * top_onehot + (q_top - q_label) * onehot
  if when == "wrong":
    corrected = jnp.where((top != labels)[:, None], corrected, q)
  return corrected


def mrkd(variables_template: PyTree, *, refresh_every: int, alpha: float = 0.5,
         temperature: float = 4.0, num_snapshots: int = 1, tc: str | None = None,
         tc_beta: float = 0.5, tc_when: str = "always") -> Method:
  r"""Memory-replay KD (MrKD), optionally with Teacher Correction (MrKD+TC).

  **Reconstruction.** No code and no full text of the paper were found; everything below is our
  reading of the abstract (see `docs/METHODS.md`). Do not report results as the paper's
  method without saying so.

  The teacher is a frozen copy `theta_hat` of the model taken earlier on its own training
  trajectory (weights and BatchNorm statistics), run in eval mode on the same (augmented,
  normalised) images as the student. With the last `K` snapshots `theta_1..theta_n`
  (`n = min(#refreshes so far, K)`):

      q   = (1/n) sum_k softmax(f(x; theta_k) / T)        (sg; tempered probabilities)
      q'  = TC(q, y)                                       (identity when tc is None)
      L   = (1 - alpha) CE(z, y) + alpha T^2 KL(q' || softmax(z / T))    if n > 0
      L   = CE(z, y)                                                     if n = 0

  With `K = 1` and no TC the distillation term is exactly `losses.distillation_kl(z,
  f(x; theta_hat), T)`. Before the first snapshot (the first `refresh_every` steps) there is no
  teacher and the loss is plain CE (not `(1 - alpha) CE`), so the first epoch trains like the
  baseline.

  Teacher Correction (on the averaged tempered probabilities `q`):
    'mix':  `q' = beta e_y + (1 - beta) q`.
    'swap': exchange `q`'s largest entry with `q_y` (the journal version's "knowledge
      adjustment"). Softmax is permutation-equivariant, so for one snapshot this is the same as
      swapping the largest logit with the label's logit before softening; for `K > 1` it swaps
      the entries of the ensemble average.
    `tc_when='always'` corrects every example, `'wrong'` only those whose teacher argmax (of
    `q`) differs from the label. For 'swap' both are the same (the swap is a no-op when the
    argmax is the label).

  Snapshot timing: `update` at step `s` (the number of optimiser steps already taken, as the
  trainer passes it) first pushes `sg(hooks.variables)` into slot `next_slot` when `s > 0` and
  `s % refresh_every == 0`, then computes the teacher from the updated buffer. So the snapshot
  taken at step `s` (the weights after `s` updates) serves steps `s .. s + refresh_every - 1`.
  With `refresh_every = steps_per_epoch` (the docs/METHODS.md default, "once per epoch") the
  teacher of epoch `e` is the model at the end of epoch `e - 1` (with `K > 1`, the average of
  the models at the ends of epochs `e-1 .. e-K`). The push is a `lax.cond`, so the copy is
  only made on refresh steps.

  Why a template: `init(rng)` cannot see the model, but the state must have fixed shapes. The
  constructor takes `variables_template`, a pytree with the model's variables' shapes and
  dtypes (arrays or `jax.ShapeDtypeStruct`s), e.g.
  `jax.eval_shape(lambda: model.init(key, images, train=False))` or the initial variables
  themselves; `init` returns zeros of shape `[K, *leaf.shape]`. `hooks.variables` must have
  the same tree structure and leaf shapes (checked at trace time); leaves are cast to the
  template's dtypes when pushed.

  Defaults (ours; the abstract gives none): alpha 0.5, T 4, K 1, beta 0.5, tc_when 'always'.
  `refresh_every` has no default because it is the trainer's steps per epoch.

  Cost per step: `K` extra eval-mode forward passes (no backward; the forwards of empty slots
  are skipped at run time), one extra copy of the variables per snapshot in the state, and on
  refresh steps one copy of the variables. Under data parallelism no collective is needed: the
  snapshots are copies of variables that are already replicated.

  State: `MrKDState` (fixed shapes; replicated, never sharded).

  Args:
    variables_template: pytree of the model variables' shapes/dtypes
      (`{'params': ..., 'batch_stats': ...}`).
    refresh_every: steps between snapshots, `>= 1` (one epoch's steps for "once per epoch").
    alpha: weight of the distillation term, in [0, 1]. Default 0.5 (ours).
    temperature: `T > 0`. Default 4 (ours).
    num_snapshots: `K >= 1`, how many of the latest snapshots are averaged. Default 1.
    tc: None (MrKD), 'mix' or 'swap' (MrKD+TC).
    tc_beta: `beta` of 'mix', in [0, 1]. Default 0.5 (ours).
    tc_when: 'always' or 'wrong'.

  Returns:
    A `Method`; `update` needs `outputs['logits']`, `batch['label']` and `hooks` with
    `forward`, `variables` and `images`. Metrics: `mrkd_active` (1 once a snapshot exists),
    `mrkd_snapshots` (number filled), `mrkd_distill` (mean of `T^2 KL`, 0 while inactive),
    `mrkd_teacher_accuracy` (argmax of `q` before TC vs the label, 0 while inactive).

  References:
    Extending Label Smoothing Regularization with Self-Knowledge Distillation (LsrKD/MrKD),
    arXiv 2009.05226; journal version: Wang, Zhang, He, Li, Hu. Revisiting Label Smoothing
    Regularization with Knowledge Distillation, Applied Sciences 11(10):4699, 2021.
    Reconstruction from the abstract: no code and no full text were found.
  """
  check_arguments(
      "mrkd",
      ("refresh_every", refresh_every, int(refresh_every) == refresh_every >= 1,
       "an integer >= 1"),
      ("num_snapshots", num_snapshots, int(num_snapshots) == num_snapshots >= 1,
       "an integer >= 1"),
      ("alpha", alpha, 0.0 <= alpha <= 1.0, "in [0, 1]"),
      ("temperature", temperature, temperature > 0, "> 0"),
      ("tc_beta", tc_beta, 0.0 <= tc_beta <= 1.0, "in [0, 1]"))
  if tc is not None and tc not in TC_MODES:
    raise ValueError(f"mrkd: unknown tc {tc!r}; allowed: None, {', '.join(TC_MODES)}")
  if tc_when not in TC_WHEN:
    raise ValueError(f"mrkd: unknown tc_when {tc_when!r}; allowed: {', '.join(TC_WHEN)}")
  template_leaves, template_def = jax.tree.flatten(variables_template)
  if not template_leaves:
    raise ValueError("mrkd: variables_template has no leaves")
  refresh_every, num_snapshots = int(refresh_every), int(num_snapshots)
  shapes = [tuple(leaf.shape) for leaf in template_leaves]
  dtypes = [jnp.dtype(leaf.dtype) for leaf in template_leaves]

  def init(rng=None) -> MrKDState:
    del rng
    buffers = [jnp.zeros((num_snapshots,) + s, d) for s, d in zip(shapes, dtypes)]
    return MrKDState(snapshots=jax.tree.unflatten(template_def, buffers),
                     num_filled=jnp.zeros((), jnp.int32),
                     next_slot=jnp.zeros((), jnp.int32))

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del axis_name  # snapshots of replicated variables are replicated: no collective
    check_state("mrkd", state, MrKDState)
    if hooks is None or hooks.forward is None or hooks.variables is None or hooks.images is None:
      raise ValueError("mrkd: needs hooks with forward, variables and images")
    logits, labels = logits_and_labels("mrkd", outputs, batch)
    num_classes = logits.shape[-1]

    # 1. Push the current variables on refresh steps (before the teacher is computed).
    current = _checked_leaves(hooks.variables, template_def, shapes, dtypes)
    step = jnp.asarray(step)
    refresh = (step > 0) & (step % refresh_every == 0)
    new_state = _push_on_refresh(state, current, refresh, num_snapshots)
    snapshots, num_filled = new_state.snapshots, new_state.num_filled

    # 2. The teacher: averaged tempered probabilities of the filled snapshots, eval mode.
    q = lax.stop_gradient(_tempered_average(snapshots, num_filled, hooks.forward, hooks.images,
                                            num_classes, temperature))
    active = num_filled > 0
    teacher_correct = (jnp.argmax(q, axis=-1) == labels).astype(jnp.float32)
    if tc is not None:
      q = _teacher_correction(q, labels, tc, tc_beta, tc_when)

    # 3. The loss; plain CE until the first snapshot exists.
    ce = losses.cross_entropy(logits, labels)
    distill = temperature**2 * losses.target_kl(logits, q, temperature=temperature)
    loss = jnp.where(active, (1.0 - alpha) * ce + alpha * distill, ce)

    active_f = active.astype(jnp.float32)
    metrics = {
        "mrkd_active": active_f,
        "mrkd_snapshots": num_filled.astype(jnp.float32),
        "mrkd_distill": active_f * jnp.mean(distill),
        "mrkd_teacher_accuracy": active_f * jnp.mean(teacher_correct),
    }
    return loss, new_state, metrics

  return Method(init, update)


def _checked_leaves(variables, template_def, shapes, dtypes):
  """The leaves of `variables` (stop-gradient, template dtypes) after checking tree and shapes."""
  leaves, treedef = jax.tree.flatten(variables)
  if treedef != template_def:
    raise ValueError(f"mrkd: hooks.variables has tree {treedef}, but variables_template has "
                     f"{template_def}")
  for i, (leaf, shape) in enumerate(zip(leaves, shapes)):
    if tuple(leaf.shape) != shape:
      raise ValueError(f"mrkd: hooks.variables leaf {i} has shape {tuple(leaf.shape)}, "
                       f"variables_template has {shape}")
  return [lax.stop_gradient(leaf).astype(d) for leaf, d in zip(leaves, dtypes)]


def _push_on_refresh(state, current, refresh, num_snapshots):
  """`state` with `current` pushed into slot `next_slot` when `refresh` (a traced flag).

  A `lax.cond`, so the copy is only made on refresh steps.
  """
  def push(buffers):
    return [buf.at[state.next_slot].set(leaf) for buf, leaf in zip(buffers, current)]

  leaves, treedef = jax.tree.flatten(state.snapshots)
  buffers = lax.cond(refresh, push, list, leaves)
  num_filled = jnp.where(refresh, jnp.minimum(state.num_filled + 1, num_snapshots),
                         state.num_filled).astype(jnp.int32)
  next_slot = jnp.where(refresh, (state.next_slot + 1) % num_snapshots,
                        state.next_slot).astype(jnp.int32)
  return MrKDState(snapshots=jax.tree.unflatten(treedef, buffers), num_filled=num_filled,
                   next_slot=next_slot)
