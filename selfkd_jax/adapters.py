"""Ready-made `MethodHooks` for Flax Linen, Flax NNX and plain JAX models.

Methods such as MrKD (weight snapshots), CS-KD (a partner forward pass) and KD/DKD/AEKT (a
frozen teacher) need more from the model than its logits: a way to run it with other
variables, the variables themselves, the images and a teacher (see `methods.base.MethodHooks`).
Writing `forward` by hand is easy to get subtly wrong (a train-mode pass that writes the
partner batch's BatchNorm statistics into the model, a teacher left in train mode, an NNX model
mutated by a second pass), so these adapters build it from what a Flax user already has.

Linen (a `TrainState` with `params` and `batch_stats`):

    template = adapters.linen_variables_template(model, images[:1], train=False)
    method = methods.mrkd(template, refresh_every=steps_per_epoch)

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      outputs, updates = state.apply_fn(variables, images, train=True,
                                        mutable=['batch_stats'])
      hooks = adapters.linen_hooks(state.apply_fn, variables, images)
      loss, method_state, metrics = method.update(
          state.method_state, outputs, batch, step=state.step, hooks=hooks)
      ...

NNX (the model is the state; call `nnx_hooks` BEFORE the model's own forward pass):

    method = methods.mrkd(adapters.nnx_variables_template(model), refresh_every=steps_per_epoch)

    def loss_fn(model, method_state, batch, step):
      hooks = adapters.nnx_hooks(model, batch['image'])   # first: before model(...)
      logits = model(batch['image'])                      # updates BatchNorm statistics
      loss, method_state, metrics = method.update(
          method_state, {'logits': logits}, batch, step=step, hooks=hooks)
      return loss.mean(), (method_state, metrics)

    @nnx.jit
    def train_step(model, optimizer, method_state, batch, step):
      grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
      (loss, (method_state, metrics)), grads = grad_fn(model, method_state, batch, step)
      optimizer.update(model, grads)
      return method_state, metrics

A frozen teacher from a Linen module and its variables, an NNX module, or a function:
`hooks = adapters.linen_hooks(..., teacher=adapters.as_teacher(teacher_module, tv))`, or
`teacher=teacher_nnx_module` / `teacher=lambda x: ...` directly.

Every `forward` and `teacher` returns a dict with `'logits'` (a model returning a bare logits
array is wrapped) and raises a `ValueError` starting with `selfkd_jax.adapters:` when the model
returns anything else, instead of a JAX error deep inside a method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

from flax import linen as nn
from flax import nnx
import jax
import numpy as np

from selfkd_jax.methods.base import MethodHooks, Outputs, PyTree

Teacher = Callable[[jax.Array], Outputs]

# What a snapshot of an NNX model copies: its weights and its BatchNorm statistics, not its
# RNG streams (a snapshot that rewound the dropout keys would be wrong) nor any other state.
NNX_SNAPSHOT_FILTER = nnx.Any(nnx.Param, nnx.BatchStat)

_ALLOWED_OUTPUTS = ("an array of logits [B, C] (ndim >= 2) or a mapping whose 'logits' entry "
                    "is such an array")
_PREFIX = "selfkd_jax.adapters:"


def _is_array(value: Any) -> bool:
  """True for jax arrays (tracers included) and numpy arrays."""
  return isinstance(value, (jax.Array, np.ndarray))


def _describe(value: Any) -> str:
  """A short description of what a model returned, for error messages."""
  if _is_array(value):
    return f"an array of shape {tuple(value.shape)}"
  if isinstance(value, Mapping):
    return f"a {type(value).__name__} with keys {sorted(map(str, value.keys()))}"
  if isinstance(value, (tuple, list)):
    return f"a {type(value).__name__} of length {len(value)}"
  return f"a {type(value).__name__}"


def as_outputs(value: Any, who: str) -> dict[str, Any]:
  """Normalises a model's return value to the `{'logits': ...}` dict methods read.

  Methods index `outputs['logits']` and expect [B, C]; checking here turns a model that
  returns a tuple or a [B] vector into a readable error instead of a shape error in a loss.

  Args:
    value: what the model or teacher returned.
    who: which callable returned it ('forward' or 'teacher'), named in the error.

  Returns:
    `{'logits': value}` for an array, a dict copy of a mapping (other keys kept).

  Raises:
    ValueError: if `value` is neither kind.
  """
  if _is_array(value) and value.ndim >= 2:
    return {"logits": value}
  if isinstance(value, Mapping):
    logits = value.get("logits")
    if _is_array(logits) and logits.ndim >= 2:
      return dict(value)
  raise ValueError(f"{_PREFIX} {who} returned {_describe(value)}; allowed: {_ALLOWED_OUTPUTS}")


# --- Linen ----------------------------------------------------------------------------------


def _train_kwargs(train_kwarg: str | None, train: bool) -> dict[str, bool]:
  """`{train_kwarg: train}`, or nothing for models whose `__call__` has no train flag."""
  return {} if train_kwarg is None else {train_kwarg: train}


def linen_forward(apply_fn: Callable[..., Any], *, train_kwarg: str | None = "train",
                  mutable: Sequence[str] = ("batch_stats",),
                  rngs: Mapping[str, jax.Array] | None = None) -> Callable[..., Outputs]:
  """`forward(variables, images, *, train)` for a Linen `apply_fn`; see `linen_hooks`."""
  collections = (mutable,) if isinstance(mutable, str) else tuple(mutable)

  def forward(variables, images, *, train):
    kwargs = _train_kwargs(train_kwarg, train)
    if not train:
      return as_outputs(apply_fn(variables, images, **kwargs), "forward")
    if rngs is not None:
      kwargs["rngs"] = rngs
    present = [c for c in collections if c in variables]
    if not present:  # nothing to update (no BatchNorm): a plain call
      return as_outputs(apply_fn(variables, images, **kwargs), "forward")
    outputs, _ = apply_fn(variables, images, mutable=present, **kwargs)  # updates dropped
    return as_outputs(outputs, "forward")

  return forward


def linen_hooks(apply_fn: Callable[..., Any], variables: PyTree, images: jax.Array, *,
                teacher: Any = None, train_kwarg: str | None = "train",
                mutable: Sequence[str] = ("batch_stats",),
                rngs: Mapping[str, jax.Array] | None = None) -> MethodHooks:
  """`MethodHooks` for a Linen model, built inside the loss function of a train step.

  Args:
    apply_fn: `model.apply` or a `TrainState.apply_fn`.
    variables: the variables of this step (`{'params': params, 'batch_stats': ...}`), the
      ones the main forward pass uses (so before this batch's BatchNorm update).
    images: the batch's images as the model sees them (augmented, normalised).
    teacher: None, or anything `as_teacher` accepts without variables (an NNX module, a
      function, or `as_teacher(linen_module, teacher_variables)`).
    train_kwarg: the name of the model's train flag in `__call__`, or None when it has none
      (then `train` is ignored by `forward`).
    mutable: collections a train-mode call updates (those present in the variables are made
      mutable and their updates dropped, so a second pass never moves the running averages).
    rngs: rngs for train-mode calls, e.g. `{'dropout': key}`. Pass a key other than the main
      pass's (`jax.random.fold_in(key, 1)`) so that the second pass draws its own masks.

  Returns:
    `MethodHooks(forward, variables, images, teacher)`.
  """
  forward = linen_forward(apply_fn, train_kwarg=train_kwarg, mutable=mutable, rngs=rngs)
  return MethodHooks(forward=forward, variables=variables, images=images,
                     teacher=_optional_teacher(teacher))


def linen_variables_template(model: nn.Module, sample_input: Any, *, rngs: Any = None,
                             **init_kwargs: Any) -> PyTree:
  """Shapes and dtypes of `model.init(rngs, sample_input, **init_kwargs)`, without computing it.

  `methods.mrkd` needs its snapshot buffer's shapes when it is built, before any train state
  exists; this lets a user build it from the model alone.

  Args:
    model: the Linen module.
    sample_input: an input batch (any batch size) or a `jax.ShapeDtypeStruct`.
    rngs: the init rngs; default `jax.random.key(0)` (only shapes matter).
    **init_kwargs: passed to `model.init`, e.g. `train=False`.

  Returns:
    The variables tree (e.g. `{'params': ..., 'batch_stats': ...}`) of `ShapeDtypeStruct`s.
  """
  rngs = jax.random.key(0) if rngs is None else rngs
  return jax.eval_shape(lambda r, x: model.init(r, x, **init_kwargs), rngs, sample_input)


# --- NNX ------------------------------------------------------------------------------------


def _check_nnx_module(model: Any, who: str) -> None:
  if not isinstance(model, nnx.Module):
    raise ValueError(f"{_PREFIX} {who} needs an nnx.Module, got a {type(model).__name__}; for a "
                     f"Linen model use linen_hooks(model.apply, variables, images)")


def _copy_state(state: nnx.State) -> nnx.State:
  """A State of fresh Variable objects holding the same arrays.

  `nnx.split` returns the model's own Variable objects (flax 0.12), so a module merged from
  them would write its updates (BatchNorm statistics, RNG counts) into the user's model, and
  `nnx.replace_by_pure_dict` rebinds the entries of the State it is given, which must not be
  the one this closure keeps across calls (it would end up holding another trace's arrays).
  """
  return jax.tree.map(lambda x: x, state)


def _set_mode(module: nnx.Module, train: bool) -> None:
  """Train or eval mode on a private copy (`deterministic`/`use_running_average` flags)."""
  if train:
    module.train()
  else:
    module.eval()


def nnx_variables_template(model: nnx.Module) -> PyTree:
  """Shapes and dtypes of `nnx_hooks(model, ...).variables`, for `methods.mrkd`'s template."""
  _check_nnx_module(model, "nnx_variables_template")
  variables = nnx.to_pure_dict(nnx.state(model, NNX_SNAPSHOT_FILTER))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)


def nnx_hooks(model: nnx.Module, images: jax.Array, *, teacher: Any = None) -> MethodHooks:
  """`MethodHooks` for an NNX model, built inside the loss function.

  Ordering rule: call it BEFORE the model's own forward pass on the batch. An NNX model is its
  state: a train-mode call writes this batch's BatchNorm statistics into it at once. Called
  after that call, `variables` (what MrKD snapshots) would already hold statistics that
  include the current batch, unlike Linen where the step's variables precede its update.

  `variables` is a plain nested dict of arrays (`nnx.to_pure_dict`) of the model's `nnx.Param`
  and `nnx.BatchStat` variables only (see `NNX_SNAPSHOT_FILTER`): what a weight snapshot
  should copy. RNG streams and other state stay with the model.

  `forward(variables, images, *, train)` merges a private copy of the model with the given
  variables, sets it to train mode (`module.train()`: `deterministic=False`,
  `use_running_average=False`) or eval mode (`module.eval()`), runs it and throws the copy
  away, so the user's model is never mutated and train-mode BatchNorm updates are dropped. In
  train mode the copy's dropout keys are `jax.random.fold_in(key, 1)` of the model's, so a
  second pass draws other masks than the main one. Works inside `nnx.jit` with
  `nnx.value_and_grad(loss_fn)(model)` and inside plain `jax.jit`.

  Args:
    model: the NNX model as the loss function sees it.
    images: the batch's images as the model sees them.
    teacher: None or anything `as_teacher` accepts without variables.

  Returns:
    `MethodHooks(forward, variables, images, teacher)`.

  Raises:
    ValueError: if `model` is not an `nnx.Module`.
  """
  _check_nnx_module(model, "nnx_hooks")
  graphdef, snapshot_state, keys, rest = nnx.split(model, NNX_SNAPSHOT_FILTER, nnx.RngKey, ...)
  variables = nnx.to_pure_dict(snapshot_state)
  expected_tree = jax.tree.structure(variables)

  def forward(variables, images, *, train):
    if jax.tree.structure(variables) != expected_tree:
      raise ValueError(f"{_PREFIX} forward got variables with tree "
                       f"{jax.tree.structure(variables)}; expected the tree of "
                       f"nnx_hooks(...).variables, {expected_tree}")
    state = _copy_state(snapshot_state)
    nnx.replace_by_pure_dict(state, variables)
    step_keys = _copy_state(keys)
    if train:
      step_keys = jax.tree.map(lambda key: jax.random.fold_in(key, 1), step_keys)
    module = nnx.merge(graphdef, state, step_keys, _copy_state(rest))
    _set_mode(module, train)
    return as_outputs(module(images), "forward")

  return MethodHooks(forward=forward, variables=variables, images=images,
                     teacher=_optional_teacher(teacher))


# --- Teachers -------------------------------------------------------------------------------


def _nnx_eval_call(module: nnx.Module) -> Callable[[jax.Array], Any]:
  """Runs an eval-mode copy of `module`, split at call time so traced state is picked up."""

  def call(images):
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, _copy_state(state))
    copy.eval()
    return copy(images)

  return call


def _teacher_call(teacher: Any, variables: PyTree | None,
                  train_kwarg: str | None) -> Callable[[jax.Array], Any]:
  """The raw eval-mode call of a Linen module + variables, an NNX module or a function."""
  if isinstance(teacher, nn.Module):
    if variables is None:
      raise ValueError(f"{_PREFIX} teacher is a Linen {type(teacher).__name__} without "
                       f"variables; pass as_teacher(module, variables)")
    kwargs = _train_kwargs(train_kwarg, False)
    return lambda images: teacher.apply(variables, images, **kwargs)
  if variables is not None:
    raise ValueError(f"{_PREFIX} teacher variables are only for a Linen module; got them with "
                     f"a {type(teacher).__name__}")
  if isinstance(teacher, nnx.Module):
    return _nnx_eval_call(teacher)
  if callable(teacher):
    return teacher
  raise ValueError(f"{_PREFIX} teacher must be a Linen module (with its variables), an "
                   f"nnx.Module or a function images -> logits or dict; got a "
                   f"{type(teacher).__name__}")


def as_teacher(teacher: Any, variables: PyTree | None = None, *,
               train_kwarg: str | None = "train") -> Teacher:
  """A frozen teacher `teacher(images) -> {'logits': ...}` for `MethodHooks.teacher`.

  Eval mode (Linen: `train_kwarg=False`; NNX: an `eval()` copy, the module itself untouched)
  and `jax.lax.stop_gradient` on the outputs, so no gradient reaches the teacher or the
  images through it, whatever the caller differentiates.

  Args:
    teacher: a Linen module (with `variables`), an `nnx.Module`, or a function
      `images -> logits or dict with 'logits'` (called as is).
    variables: the Linen teacher's variables; only for a Linen module.
    train_kwarg: the Linen teacher's train flag, or None when its `__call__` has none.

  Returns:
    `teacher(images) -> outputs dict`.

  Raises:
    ValueError: for a Linen module without variables, variables with anything else, or an
      object that is none of the three.
  """
  call = _teacher_call(teacher, variables, train_kwarg)

  def frozen(images):
    return jax.lax.stop_gradient(as_outputs(call(images), "teacher"))

  return frozen


def _optional_teacher(teacher: Any) -> Teacher | None:
  return None if teacher is None else as_teacher(teacher)
