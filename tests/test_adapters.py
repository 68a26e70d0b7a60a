"""The Linen/NNX/function adapters: forward passes, snapshots, teachers and named errors."""
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfkd_jax import adapters, methods
from selfkd_jax.methods.base import MethodHooks
from numpy_reference import log_softmax, softmax

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(8, 6)), jnp.float32)
PARTNER = jnp.asarray(RNG.normal(size=(8, 6)) + 0.5, jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 3, 8), jnp.int32)
BATCH = {"label": LABELS, "index": jnp.arange(8, dtype=jnp.int32)}


def _allclose(actual, desired):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=1e-6, atol=1e-7)


def _numpy_tree(tree):
  """A copy that later changes to the arrays' owner cannot reach (keys as their raw bits)."""
  def copy(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.array(a, copy=True)

  return jax.tree.map(copy, tree)


def _assert_trees_equal(a, b):
  a, b = _numpy_tree(a), _numpy_tree(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- models -------------------------------------------------------------------------------


class LinenMLP(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense; `as_dict` returns `{'logits', 'features'}`."""
  as_dict: bool = False

  @nn.compact
  def __call__(self, x, train):
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(5)(x)))
    logits = nn.Dense(3)(h)
    return {"logits": logits, "features": h} if self.as_dict else logits


class LinenNoFlag(nn.Module):
  """Like the Flax MNIST CNN: `__call__(self, x)` has no train flag."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


class LinenDropout(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(5)(x)))


class LinenBad(nn.Module):
  """Returns `(logits, features)`, which no method can read."""

  @nn.compact
  def __call__(self, x, train):
    del train
    h = nn.Dense(5)(x)
    return nn.Dense(3)(h), h


class NnxMLP(nnx.Module):
  """The NNX twin of `LinenMLP` (same layers, same BatchNorm momentum and epsilon)."""

  def __init__(self, rngs, dropout=0.0):
    self.l1 = nnx.Linear(6, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.l2 = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.l1(x)))
    if self.drop is not None:
      h = self.drop(h)
    return self.l2(h)


def _linen_variables(model=LinenMLP(), seed=0):
  """Initial variables with non-trivial running statistics, so eval and train mode differ."""
  variables = model.init(jax.random.key(seed), X, train=False)
  r = np.random.default_rng(seed + 1)
  variables["batch_stats"] = {"BatchNorm_0": {
      "mean": jnp.asarray(r.normal(size=5), jnp.float32),
      "var": jnp.asarray(r.uniform(0.5, 2.0, size=5), jnp.float32)}}
  return variables


def _nnx_from_linen(variables, dropout=0.0):
  """An `NnxMLP` holding the same weights and statistics as the Linen variables."""
  model = NnxMLP(nnx.Rngs(0, dropout=1), dropout=dropout)
  params, stats = variables["params"], variables["batch_stats"]
  pure = {"l1": dict(params["Dense_0"]), "l2": dict(params["Dense_1"]),
          "bn": {**params["BatchNorm_0"], **stats["BatchNorm_0"]}}
  state = nnx.state(model, adapters.NNX_SNAPSHOT_FILTER)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


def _nnx_eval_logits(model, images):
  """The model's own eval-mode output, on a clone so the model keeps its mode."""
  clone = nnx.clone(model)
  clone.eval()
  return clone(images)


def _linen_train_logits(model, variables, images):
  return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]


# --- Linen forward --------------------------------------------------------------------------


def test_linen_forward_eval_equals_apply():
  model, variables = LinenMLP(), _linen_variables()
  hooks = adapters.linen_hooks(model.apply, variables, X)
  outputs = hooks.forward(hooks.variables, X, train=False)
  assert set(outputs) == {"logits"}  # the bare array, wrapped
  np.testing.assert_array_equal(outputs["logits"], model.apply(variables, X, train=False))
  assert hooks.images is X and hooks.variables is variables and hooks.teacher is None


def test_linen_forward_train_equals_apply_and_leaves_variables():
  model, variables = LinenMLP(), _linen_variables()
  before = _numpy_tree(variables)
  forward = adapters.linen_hooks(model.apply, variables, X).forward
  outputs = forward(variables, X, train=True)
  assert set(outputs) == {"logits"}  # the batch-stat updates are not returned
  np.testing.assert_array_equal(outputs["logits"], _linen_train_logits(model, variables, X))
  # Train mode normalises with the batch's statistics, not the running ones.
  assert not np.allclose(outputs["logits"], model.apply(variables, X, train=False))
  _assert_trees_equal(variables, before)


def test_linen_forward_without_train_flag():
  model = LinenNoFlag()
  variables = model.init(jax.random.key(0), X)
  forward = adapters.linen_hooks(model.apply, variables, X, train_kwarg=None).forward
  for train in (False, True):
    np.testing.assert_array_equal(forward(variables, X, train=train)["logits"],
                                  model.apply(variables, X))
  with pytest.raises(TypeError):  # the default passes train=..., which this model refuses
    adapters.linen_hooks(model.apply, variables, X).forward(variables, X, train=False)


def test_linen_forward_passes_rngs_in_train_mode_only():
  model = LinenDropout()
  variables = model.init(jax.random.key(0), X, train=False)
  rngs = {"dropout": jax.random.key(5)}
  forward = adapters.linen_hooks(model.apply, variables, X, rngs=rngs).forward
  np.testing.assert_array_equal(forward(variables, X, train=True)["logits"],
                                model.apply(variables, X, train=True, rngs=rngs))
  np.testing.assert_array_equal(forward(variables, X, train=False)["logits"],
                                model.apply(variables, X, train=False))
  assert not np.allclose(forward(variables, X, train=True)["logits"],
                         forward(variables, X, train=False)["logits"])


def test_linen_forward_keeps_a_dict_output():
  model = LinenMLP(as_dict=True)
  variables = _linen_variables(model)
  outputs = adapters.linen_hooks(model.apply, variables, X).forward(variables, X, train=False)
  expected = model.apply(variables, X, train=False)
  assert set(outputs) == {"logits", "features"}
  np.testing.assert_array_equal(outputs["features"], expected["features"])


def test_linen_variables_template():
  model = LinenMLP()
  template = adapters.linen_variables_template(model, X[:1], train=False)
  variables = _linen_variables()
  assert jax.tree.structure(template) == jax.tree.structure(variables)
  for t, v in zip(jax.tree.leaves(template), jax.tree.leaves(variables)):
    assert isinstance(t, jax.ShapeDtypeStruct)
    assert (t.shape, t.dtype) == (v.shape, v.dtype)


# --- NNX forward ----------------------------------------------------------------------------


def test_nnx_forward_eval_equals_model_and_linen_twin():
  variables = _linen_variables()
  model = _nnx_from_linen(variables)
  hooks = adapters.nnx_hooks(model, X)
  logits = hooks.forward(hooks.variables, X, train=False)["logits"]
  np.testing.assert_array_equal(logits, _nnx_eval_logits(model, X))
  _allclose(logits, LinenMLP().apply(variables, X, train=False))
  # Only weights and statistics are snapshot variables, as a plain dict.
  assert set(hooks.variables) == {"l1", "bn", "l2"}
  assert set(hooks.variables["bn"]) == {"scale", "bias", "mean", "var"}


def test_nnx_forward_train_leaves_the_model_unchanged():
  model = _nnx_from_linen(_linen_variables())
  model.train()
  before = _numpy_tree(nnx.to_pure_dict(nnx.state(model)))
  hooks = adapters.nnx_hooks(model, X)
  logits = hooks.forward(hooks.variables, PARTNER, train=True)["logits"]
  clone = nnx.clone(model)
  np.testing.assert_array_equal(logits, clone(PARTNER))  # the train-mode output ...
  assert not np.allclose(nnx.to_pure_dict(nnx.state(clone))["bn"]["mean"],
                         before["bn"]["mean"])  # ... whose statistic update was dropped:
  _assert_trees_equal(nnx.to_pure_dict(nnx.state(model)), before)
  hooks.forward(hooks.variables, X, train=False)
  assert model.bn.use_running_average is False  # the model's mode is its own


def test_nnx_forward_under_nnx_jit_leaves_model_and_rng_unchanged():
  model = _nnx_from_linen(_linen_variables(), dropout=0.5)
  model.train()
  before = _numpy_tree(nnx.to_pure_dict(nnx.state(model, ...)))

  @nnx.jit
  def second_pass(model, images):
    hooks = adapters.nnx_hooks(model, images)
    return hooks.forward(hooks.variables, images, train=True)["logits"]

  logits = second_pass(model, X)
  _assert_trees_equal(nnx.to_pure_dict(nnx.state(model, ...)), before)  # RngCount included
  # Dropout drew masks from a branch of the model's stream: not the main pass's masks.
  assert not np.allclose(logits, nnx.clone(model)(X))


def test_nnx_ordering_rule_hooks_before_the_forward():
  model = _nnx_from_linen(_linen_variables())
  model.train()

  def make_step(hooks_first):
    def loss_fn(model):
      hooks = adapters.nnx_hooks(model, X) if hooks_first else None
      logits = model(X)  # the main pass: writes this batch's statistics into the model
      if not hooks_first:
        hooks = adapters.nnx_hooks(model, X)
      return logits.sum(), hooks.variables["bn"]["mean"]

    @nnx.jit
    def step(model):
      (_, mean), _ = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      return mean

    return step

  pre = np.array(model.bn.mean[...])
  seen_first = make_step(True)(model)
  post = np.array(model.bn.mean[...])
  assert not np.allclose(pre, post)
  np.testing.assert_array_equal(seen_first, pre)  # the step's variables, as Linen's
  seen_after = make_step(False)(model)  # what goes wrong: the snapshot holds the update
  assert not np.allclose(seen_after, post)  # (the update of this second step) ...
  np.testing.assert_array_equal(seen_after, np.array(model.bn.mean[...]))


def test_nnx_variables_template_matches_hooks():
  model = NnxMLP(nnx.Rngs(0, dropout=1), dropout=0.5)
  template = adapters.nnx_variables_template(model)
  variables = adapters.nnx_hooks(model, X).variables
  assert jax.tree.structure(template) == jax.tree.structure(variables)
  for t, v in zip(jax.tree.leaves(template), jax.tree.leaves(variables)):
    assert isinstance(t, jax.ShapeDtypeStruct) and (t.shape, t.dtype) == (v.shape, v.dtype)


# --- MrKD end to end ------------------------------------------------------------------------

TEMPERATURE = 2.0


def _mrkd_expected(logits, teacher_logits, labels):
  """Per-example MrKD loss (one snapshot, alpha 0.5) and teacher accuracy, in numpy."""
  z, y = np.asarray(logits, np.float64), np.asarray(labels)
  q = softmax(np.asarray(teacher_logits, np.float64) / TEMPERATURE)
  ce = -log_softmax(z)[np.arange(len(y)), y]
  kl = np.sum(q * (np.log(q) - log_softmax(z / TEMPERATURE)), -1)
  return 0.5 * ce + 0.5 * TEMPERATURE**2 * kl, np.mean(np.argmax(q, -1) == y)


def _check_mrkd_step(step, metrics, loss, logits, teacher_logits):
  if step == 0:
    assert float(metrics["mrkd_active"]) == 0.0
    return
  expected_loss, expected_accuracy = _mrkd_expected(logits, teacher_logits, LABELS)
  assert float(metrics["mrkd_active"]) == 1.0
  assert float(metrics["mrkd_teacher_accuracy"]) == pytest.approx(expected_accuracy, abs=1e-7)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)


def test_mrkd_end_to_end_linen():
  model = LinenMLP()
  method = methods.mrkd(adapters.linen_variables_template(model, X, train=False),
                        refresh_every=1, temperature=TEMPERATURE)
  tx = optax.sgd(0.5)

  @jax.jit
  def train_step(variables, opt_state, method_state, step):
    def loss_fn(params):
      current = {"params": params, "batch_stats": variables["batch_stats"]}
      logits, updates = model.apply(current, X, train=True, mutable=["batch_stats"])
      hooks = adapters.linen_hooks(model.apply, current, X)
      loss, method_state_, metrics = method.update(method_state, {"logits": logits}, BATCH,
                                                   step=step, hooks=hooks)
      return loss.mean(), (loss, logits, updates, method_state_, metrics)

    grads, aux = jax.grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(variables["params"], updates)
    return {"params": params, "batch_stats": aux[2]["batch_stats"]}, opt_state, aux

  variables = _linen_variables()
  opt_state, method_state = tx.init(variables["params"]), method.init()
  for step in range(3):
    teacher_logits = model.apply(variables, X, train=False)  # the snapshot of this step
    variables, opt_state, (loss, logits, _, method_state, metrics) = train_step(
        variables, opt_state, method_state, step)
    _check_mrkd_step(step, metrics, loss, logits, teacher_logits)
  assert int(method_state.num_filled) == 1


def test_mrkd_end_to_end_nnx():
  model = _nnx_from_linen(_linen_variables())
  model.train()
  method = methods.mrkd(adapters.nnx_variables_template(model), refresh_every=1,
                        temperature=TEMPERATURE)
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, method_state, step):
    def loss_fn(model):
      hooks = adapters.nnx_hooks(model, X)  # before the model's own pass
      logits = model(X)
      loss, method_state_, metrics = method.update(method_state, {"logits": logits}, BATCH,
                                                   step=step, hooks=hooks)
      return loss.mean(), (loss, logits, method_state_, metrics)

    (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return aux

  method_state = method.init()
  for step in range(3):
    teacher_logits = _nnx_eval_logits(model, X)  # the model before this step
    loss, logits, method_state, metrics = train_step(model, optimizer, method_state, step)
    _check_mrkd_step(step, metrics, loss, logits, teacher_logits)
  assert int(method_state.num_filled) == 1


# --- CS-KD ----------------------------------------------------------------------------------

CSKD_BATCH = dict(BATCH, partner_image=PARTNER)


def _cskd_loss(hooks, logits):
  return methods.cskd().update((), {"logits": logits}, CSKD_BATCH, step=0, hooks=hooks)[0]


def test_cskd_partner_forward_linen_equals_hand_written():
  model, variables = LinenMLP(), _linen_variables()
  logits = _linen_train_logits(model, variables, X)

  def hand_forward(v, images, *, train):
    assert train
    return {"logits": _linen_train_logits(model, v, images)}

  expected = _cskd_loss(MethodHooks(forward=hand_forward, variables=variables), logits)
  actual = _cskd_loss(adapters.linen_hooks(model.apply, variables, X), logits)
  np.testing.assert_array_equal(actual, expected)


def test_cskd_partner_forward_nnx_equals_hand_written():
  model = _nnx_from_linen(_linen_variables())
  model.train()
  before = _numpy_tree(nnx.to_pure_dict(nnx.state(model)))

  # Plain jax.jit (the NNX model goes in as graphdef + state); both versions jitted alike.
  @jax.jit
  def hand_written(graphdef, state):
    model = nnx.merge(graphdef, state)
    partner_logits = nnx.clone(model)(PARTNER)  # a train-mode copy, its update thrown away

    def forward(v, images, *, train):
      del v, images, train
      return {"logits": partner_logits}

    return _cskd_loss(MethodHooks(forward=forward, variables={}), model(X))

  @jax.jit
  def through_adapter(graphdef, state):
    model = nnx.merge(graphdef, state)
    hooks = adapters.nnx_hooks(model, X)
    return _cskd_loss(hooks, model(X))

  _allclose(through_adapter(*nnx.split(model)), hand_written(*nnx.split(model)))
  _assert_trees_equal(nnx.to_pure_dict(nnx.state(model)), before)


# --- teachers -------------------------------------------------------------------------------


def _teachers():
  """One set of weights as a Linen module + variables, an NNX module and a function."""
  model, variables = LinenMLP(), _linen_variables(seed=7)
  nnx_model = _nnx_from_linen(variables)
  nnx_model.train()  # as_teacher must still run it in eval mode
  return {
      "linen": adapters.as_teacher(model, variables),
      "nnx": adapters.as_teacher(nnx_model),
      "function": adapters.as_teacher(lambda x: model.apply(variables, x, train=False)),
  }, model.apply(variables, X, train=False), nnx_model


def test_as_teacher_equal_logits_in_eval_mode():
  teachers, expected, nnx_model = _teachers()
  np.testing.assert_array_equal(teachers["linen"](X)["logits"], expected)
  np.testing.assert_array_equal(teachers["function"](X)["logits"], expected)
  _allclose(teachers["nnx"](X)["logits"], expected)
  np.testing.assert_array_equal(teachers["nnx"](X)["logits"], _nnx_eval_logits(nnx_model, X))
  assert nnx_model.bn.use_running_average is False  # the module itself is untouched


@pytest.mark.parametrize("kind", ["linen", "nnx", "function"])
def test_as_teacher_stops_gradients(kind):
  teacher = _teachers()[0][kind]
  grad = jax.grad(lambda x: jnp.sum(teacher(x)["logits"] ** 2))(X)
  np.testing.assert_array_equal(grad, np.zeros_like(X))


def test_as_teacher_stops_gradients_to_linen_variables():
  model, variables = LinenMLP(), _linen_variables()
  grads = jax.grad(lambda v: jnp.sum(adapters.as_teacher(model, v)(X)["logits"] ** 2))(
      variables)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
  direct = jax.grad(lambda v: jnp.sum(model.apply(v, X, train=False) ** 2))(variables)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(direct))  # not vacuous


def test_kd_network_teacher_through_each_adapter():
  teachers, teacher_logits, nnx_teacher = _teachers()
  method = methods.kd(methods.network_teacher(), alpha=0.5, temperature=TEMPERATURE)
  student, variables = LinenMLP(), _linen_variables(seed=3)
  logits = student.apply(variables, X, train=False)

  def run(hooks):
    return method.update((), {"logits": logits}, BATCH, step=0, hooks=hooks)[0]

  expected = run(MethodHooks(images=X, teacher=lambda x: {"logits": teacher_logits}))
  for teacher in (teachers["linen"], teachers["function"], nnx_teacher):
    _allclose(run(adapters.linen_hooks(student.apply, variables, X, teacher=teacher)), expected)
  nnx_student = _nnx_from_linen(variables)
  for teacher in (teachers["linen"], nnx_teacher):
    _allclose(run(adapters.nnx_hooks(nnx_student, X, teacher=teacher)), expected)


# --- named errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("returned, described", [
    (lambda v, x: (x, x), "a tuple of length 2"),
    (lambda v, x: x[:, 0], r"an array of shape \(8,\)"),
    (lambda v, x: {"probs": x}, r"a dict with keys \['probs'\]"),
])
def test_forward_returning_something_else_is_named(returned, described):
  forward = adapters.linen_hooks(returned, {}, X, train_kwarg=None).forward
  with pytest.raises(ValueError, match=rf"^selfkd_jax\.adapters: forward returned {described}"
                     r"; allowed: an array of logits \[B, C\]"):
    forward({}, X, train=False)


def test_linen_model_returning_a_tuple_is_named():
  model = LinenBad()
  variables = model.init(jax.random.key(0), X, train=False)
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: forward returned a tuple"):
    adapters.linen_hooks(model.apply, variables, X).forward(variables, X, train=True)


def test_teacher_returning_something_else_is_named():
  teacher = adapters.as_teacher(lambda x: x.sum(-1))
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: teacher returned an array of "
                     r"shape \(8,\); allowed"):
    teacher(X)


def test_linen_teacher_without_variables_is_named():
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: teacher is a Linen LinenMLP "
                     r"without variables"):
    adapters.as_teacher(LinenMLP())
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: teacher is a Linen"):
    adapters.linen_hooks(lambda v, x: x, {}, X, teacher=LinenMLP())


def test_teacher_of_unknown_kind_is_named():
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: teacher must be a Linen module"
                     r".*got a int"):
    adapters.as_teacher(42)
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: teacher variables are only for "
                     r"a Linen module"):
    adapters.as_teacher(lambda x: x, {"params": {}})


def test_nnx_hooks_on_a_non_nnx_model_is_named():
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: nnx_hooks needs an nnx\.Module, "
                     r"got a LinenMLP"):
    adapters.nnx_hooks(LinenMLP(), X)
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: nnx_variables_template needs"):
    adapters.nnx_variables_template({"params": {}})


def test_nnx_forward_with_other_variables_is_named():
  hooks = adapters.nnx_hooks(NnxMLP(nnx.Rngs(0)), X)
  with pytest.raises(ValueError, match=r"^selfkd_jax\.adapters: forward got variables with tree"):
    hooks.forward({"l1": hooks.variables["l1"]}, X, train=False)
