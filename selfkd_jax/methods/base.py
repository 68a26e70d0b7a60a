"""The method contract: optax-style `init/update` transforms over explicit state pytrees.

A method is a `Method(init, update, ...)` of pure functions:

    state = method.init(rng)
    per_example_loss, state, metrics = method.update(
        state, outputs, batch, step=step, axis_name=None, hooks=None)

- `outputs` is the model's output mapping; every method reads `outputs['logits']` ([B, C]) and
  some read more (`'features'`, `'feature_map'`, ...).
- `batch` is a mapping with `'label'` (int [B], class ids `0..C-1`) and `'index'` (int [B]: each
  example's position `0..N-1` in the training set, the same every epoch; methods with
  per-example state key their rows by it, and indices within one global batch are distinct).
- `step` is the **0-based optimizer step** of the update being computed: what Flax's
  `TrainState.step` and optax count (0 for the first batch). A method that follows an epoch
  schedule (PS-KD's alpha, DKD's warm-up) is given `steps_per_epoch` when it is built and
  derives the epoch itself, so no caller can get the epoch base wrong. Traced inside a jitted
  step, so there is no retrace per step or epoch.
- `axis_name` is the named mesh axis when `update` runs inside `shard_map`/`pmap` (the trainer
  passes `'data'`), `None` on a single device. Methods use it for their collectives.
- `hooks` is a `MethodHooks` carrying what a method needs from the model (a forward pass with
  other parameters, say); methods that need none ignore it.
- The returned loss is per example ([B]); the caller averages it over the global batch.
- `metrics` is a dict of scalars (already reduced over the local batch) for logging.

A `Method` is a static value: frozen, hashable, and a pytree with no leaves (the method itself
is the tree's static structure). So it can be closed over, passed as a static argument
(`jax.jit(..., static_argnames='method')`; `nnx.jit` too, which flattens static arguments), held
in a `flax.struct` field (with or without `pytree_node=False`), or even passed as an ordinary
argument of a jitted function: it never becomes a traced value, and a different method is a
different compilation cache key.

`refresh` is `None` for most methods. A method that rebuilds its state from a clean pass over
the training data at the end of an epoch (PS-KD's `refresh='epoch_end_eval'`) sets it to
`refresh(state, outputs, batch, *, axis_name=None) -> state`, called with eval-mode,
un-augmented outputs for every training batch.

Parameters a method trains (RAS-KD's auxiliary classifier, AEKT's serialization head, BYOT's
and LSSKD's exits) are not in its state: they are Flax modules attached to the model
(`selfkd_jax.heads.with_heads`), trained with the model's parameters by the caller's optimizer;
the method reads their outputs (`outputs['aux_logits']`, `outputs['exit_logits']`, ...) and its
loss holds the terms that train them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp

PyTree = Any
Outputs = Mapping[str, jax.Array]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class InitFn(Protocol):

  def __call__(self, rng: jax.Array | None = None) -> PyTree:
    ...


class UpdateFn(Protocol):

  def __call__(
      self,
      state: PyTree,
      outputs: Outputs,
      batch: Batch,
      *,
      step: jax.Array,
      axis_name: str | None = None,
      hooks: Optional["MethodHooks"] = None,
  ) -> tuple[jax.Array, PyTree, Metrics]:
    ...


class MethodHooks(NamedTuple):
  """What a method may ask of the model, supplied by whoever runs the step.

  Attributes:
    forward: `forward(variables, images, *, train) -> outputs` runs the user's model with the
      given variables (e.g. `{'params': ..., 'batch_stats': ...}`) without touching the caller's
      state (in train mode its BatchNorm statistics updates are dropped); used by methods that
      need a second forward pass (a weight snapshot, a partner batch). `None` when the caller
      offers none.
    variables: the current model variables, for methods that snapshot them.
    images: the batch's images as augmented and normalised for the model (B rows, before
      LSSKD's rotations), for methods that run another network on the same inputs (a
      snapshot, a teacher).
    teacher: `teacher(images) -> outputs` runs a frozen teacher network in eval mode (no
      gradient); `None` when the run has no network teacher.

  `selfkd_jax.adapters` builds these from a Flax Linen or NNX model.
  """
  forward: Callable[..., Outputs] | None = None
  variables: PyTree | None = None
  images: jax.Array | None = None
  teacher: Callable[[jax.Array], Outputs] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-distillation method as a pair of pure functions (plus optional extras).

  A static value (see the module docstring): frozen, hashable, compared by its functions, and
  not a pytree. `refresh` is the one optional extra (see the module docstring).
  """
  init: InitFn
  update: UpdateFn
  refresh: Callable[..., PyTree] | None = None


# A pytree node with no children and the method itself as static data: JAX never tries to trace
# its functions (a NamedTuple of functions failed with "<function> is not a valid JAX type"),
# and a method passed as an argument is part of the jit cache key, like a static argument.
jax.tree_util.register_pytree_node(Method, lambda method: ((), method),
                                   lambda method, children: method)


def epoch_of_step(step: jax.Array, steps_per_epoch: int) -> jax.Array:
  """The 0-indexed epoch of the 0-based optimizer `step` (an int scalar, traced or not)."""
  return jnp.asarray(step) // steps_per_epoch


def check_steps_per_epoch(name: str, steps_per_epoch: int | None, needed_for: str) -> None:
  """Raises a ValueError naming `name` unless `steps_per_epoch` is a positive integer."""
  if (steps_per_epoch is None or isinstance(steps_per_epoch, bool)
      or not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1):
    raise ValueError(
        f"{name}: {needed_for} needs steps_per_epoch, the number of optimizer steps per epoch "
        f"(e.g. len(train_set) // batch_size), as a positive int; got {steps_per_epoch!r}")


class EmptyState(NamedTuple):
  """State of a stateless method."""


def stateless_init(rng: jax.Array | None = None) -> EmptyState:
  del rng
  return EmptyState()


def require_outputs(method: str, outputs: Outputs, keys: tuple[str, ...], hint: str = "") -> None:
  """Raises a ValueError naming `method` and the missing keys unless `outputs` has all `keys`."""
  missing = [k for k in keys if k not in outputs]
  if missing:
    raise ValueError(f"{method}: needs outputs {', '.join(repr(k) for k in missing)} (the model "
                     f"returned {', '.join(sorted(outputs))}){'; ' + hint if hint else ''}")


def logits_and_labels(method: str, outputs: Outputs, batch: Batch,
                      num_classes: int | None = None) -> tuple[jax.Array, jax.Array]:
  """`outputs['logits']` ([B, C]) and `batch['label']` ([B] class ids), checked at trace time.

  Labels of another shape broadcast silently in the losses (a `[B, 1]` column gives a
  `[B, B]` "per-example" loss whose mean averages every cross pair), and one-hot labels fail
  deep inside with a shape error, so both are refused here naming the method; so is a
  classifier of another width than the one the method's state was built for.
  """
  logits = checked_logits(method, outputs, num_classes)
  return logits, checked_labels(method, batch, logits.shape[:-1])


def checked_logits(method: str, outputs: Outputs, num_classes: int | None = None) -> jax.Array:
  """`outputs['logits']`, refused when missing or (given `num_classes`) of another width than
  the one the method's state was built for."""
  require_outputs(method, outputs, ("logits",))
  logits = outputs["logits"]
  if num_classes is not None and logits.shape[-1] != num_classes:
    raise ValueError(f"{method}: outputs['logits'] has {logits.shape[-1]} classes (shape "
                     f"{logits.shape}) but the method was built with num_classes={num_classes}")
  return logits


def checked_labels(method: str, batch: Batch, shape: tuple[int, ...] | None = None) -> jax.Array:
  """`batch['label']`, refused unless it holds integer class ids of exactly `shape` (`None`:
  any `[B]`)."""
  return _checked_ids(method, batch, "label", shape,
                      "integer class ids 0..C-1, one per example (not one-hot: the method builds "
                      "its own targets)")


def checked_indices(method: str, batch: Batch, shape: tuple[int, ...]) -> jax.Array:
  """`batch['index']`, refused unless it holds integer example positions of exactly `shape`."""
  return _checked_ids(method, batch, "index", shape,
                      "each example's 0-based position in the training set (the same every "
                      "epoch), which keys its row of the method's per-example state")


def _checked_ids(method, batch, key, shape, meaning):
  if key not in batch:
    raise ValueError(f"{method}: needs batch[{key!r}], {meaning}; the batch has "
                     f"{', '.join(repr(k) for k in sorted(batch)) or 'no keys'}")
  value = batch[key] if hasattr(batch[key], "dtype") else jnp.asarray(batch[key])
  shape_ok = value.ndim == 1 if shape is None else tuple(value.shape) == tuple(shape)
  if not jnp.issubdtype(value.dtype, jnp.integer) or not shape_ok:
    expected = "[B]" if shape is None else str(tuple(shape))
    raise ValueError(f"{method}: batch[{key!r}] must be {meaning}: an integer array of shape "
                     f"{expected}, got {value.dtype} of shape {tuple(value.shape)}")
  return value


def check_state(method: str, state: Any, state_type: type) -> None:
  """Refuses a `state` that is not what `method.init` returns (say, `None`, or `method.init`
  itself, not called), naming the method, instead of an attribute error from inside it."""
  if not isinstance(state, state_type):
    raise TypeError(f"{method}: state must be the {state_type.__name__} returned by "
                    f"method.init(rng) (kept in your train state and passed back each step), "
                    f"got {type(state).__name__}")


def check_arguments(method: str, *checks: tuple[str, Any, bool, str]) -> None:
  """Constructor validation in one place: each check is `(name, value, ok, requirement)`.

  Raises `ValueError("<method>: <name> must be <requirement>, got <value>")` for the first
  check whose `ok` is false, so every constructor refuses a bad value with the same one line.
  """
  for name, value, ok, requirement in checks:
    if not ok:
      raise ValueError(f"{method}: {name} must be {requirement}, got {value!r}")
