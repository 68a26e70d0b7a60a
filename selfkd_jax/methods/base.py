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

A `Method` is a static value: hashable and not a pytree. Close over it, pass it as a static
argument (`jax.jit(..., static_argnames='method')`), or keep it in a `flax.struct` field with
`pytree_node=False`; passing it where JAX expects arrays raises a `TypeError` that says so.

`refresh` is `None` for most methods. A method that rebuilds its state from a clean pass over
the training data at the end of an epoch (PS-KD's `refresh='epoch_end_eval'`) sets it to
`refresh(state, outputs, batch, *, axis_name=None) -> state`, called with eval-mode,
un-augmented outputs for every training batch.

`owned` is `None` for most methods. A method that trains parameters of its own on the same loss
as the model (BYOT's and LSSKD's exits) sets it to an `OwnedParams`, so a caller can
differentiate the loss with respect to the model's and the method's parameters in one backward
pass instead of letting `update` run the exits a second time for their own gradient.
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
    images: the batch's images as augmented and normalised for the model (before any
      `Method.train_inputs`), for methods that run another network on the same inputs (a
      snapshot, a teacher).
    teacher: `teacher(images) -> outputs` runs a frozen teacher network in eval mode (no
      gradient); `None` when the run has no network teacher.
    owned_differentiated: `True` when the caller differentiates the loss with respect to
      `method.owned.get(state)` along with the model's parameters and then calls
      `method.owned.apply_gradients` (see `OwnedParams`); `update` then computes the loss with
      one pass of its exits and leaves their optimizer step to the caller. `False` (default):
      `update` takes that step itself.
  """
  forward: Callable[..., Outputs] | None = None
  variables: PyTree | None = None
  images: jax.Array | None = None
  teacher: Callable[[jax.Array], Outputs] | None = None
  owned_differentiated: bool = False


class OwnedParams(NamedTuple):
  """The parameters a method trains itself, exposed so a caller can differentiate them.

  The gradient of the per-example loss mean with respect to them is what the method's own step
  would use (nothing but the method's loss terms depends on them). A caller that wants one
  backward pass for model and method:

      owned = method.owned.get(state)
      def loss_fn(params, owned):
        outputs = model.apply(params, x)
        loss, new_state, metrics = method.update(
            method.owned.put(state, owned), outputs, batch, step=step,
            hooks=MethodHooks(owned_differentiated=True))
        return loss.mean(), new_state
      (_, new_state), (grads, owned_grads) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(params, owned)
      new_state = method.owned.apply_gradients(new_state, owned_grads)

  Attributes:
    get: `get(state) -> params`, the method's trainable parameters.
    put: `put(state, params) -> state` with those parameters replaced.
    apply_gradients: `apply_gradients(state, grads) -> state`, one optimizer step of the
      parameters given the gradient of the global-batch mean loss (already averaged over
      devices).
  """
  get: Callable[[PyTree], PyTree]
  put: Callable[[PyTree, PyTree], PyTree]
  apply_gradients: Callable[[PyTree, PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-distillation method as a pair of pure functions (plus optional extras).

  A static value (see the module docstring): frozen, hashable, compared by its functions, and
  not a pytree.

  `exit_logits(state, outputs) -> {name: [B, C] logits}`: for methods that own auxiliary exits
  (BYOT, LSSKD), the exits' predictions from eval-mode model outputs, so evaluation can report
  every exit's accuracy; `None` for the others. The model's own logits are never among them.

  `train_inputs(images [B, ...]) -> images [R·B, ...]`: for methods that train the model on more
  views of each image than the batch holds (LSSKD's four rotations). The caller runs the model
  on the returned images, whose first B rows must be the batch itself, so `outputs` passed to
  `update` have R·B rows while `batch` keeps B; training accuracy is read from the first B.
  `None` = the batch as it is.

  `owned`: the parameters the method trains itself, for a caller that differentiates them with
  the model's (`OwnedParams`); `None` when it has none or trains them apart from the model's loss.
  """
  init: InitFn
  update: UpdateFn
  refresh: Callable[..., PyTree] | None = None
  exit_logits: Callable[..., dict[str, jax.Array]] | None = None
  train_inputs: Callable[[jax.Array], jax.Array] | None = None
  owned: OwnedParams | None = None


def _refuse_to_flatten(method: Method):
  raise TypeError(
      "a selfkd_jax Method is a static value, not a pytree of arrays: close over it, pass it as "
      "a static argument (jax.jit(f, static_argnames='method')), or keep it in a flax.struct "
      "field declared with pytree_node=False")


# Registered only so that tracing a method by mistake says what to do instead of failing on
# "<function> is not a valid JAX type" somewhere inside it.
jax.tree_util.register_pytree_node(Method, _refuse_to_flatten, lambda aux, children: None)


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
