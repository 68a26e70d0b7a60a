"""RAS-KD method transform against float64 numpy references, and 1 device against 4.

The references (EMA prototypes, relation matrix, targets, the auxiliary head's SGD step, the
instance-level KL) are written directly from the formulas in the method's docstring and share
no code with the library.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax.methods.ras_kd import RASKDState, ras_kd
from numpy_reference import log_softmax, softmax

C, D = 4, 3
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- references


def ref_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_ema(prototypes, seen, features, labels, momentum):
  prototypes, seen = np.array(prototypes, np.float64), np.array(seen)
  unit = ref_unit(features)
  for c in range(len(prototypes)):
    members = unit[labels == c]
    if len(members) == 0:
      continue
    mean = members.mean(0)
    prototypes[c] = momentum * prototypes[c] + (1 - momentum) * mean if seen[c] else mean
    seen[c] = True
  return prototypes, seen


def ref_relations(prototypes, tau):
  unit = ref_unit(prototypes)
  cos = unit @ unit.T / tau
  np.fill_diagonal(cos, -np.inf)
  return softmax(cos)


def ref_relation_targets(prototypes, labels, epsilon, tau):
  onehot = np.eye(len(prototypes))[labels]
  return (1 - epsilon) * onehot + epsilon * ref_relations(prototypes, tau)[labels]


def ref_exclusive_ls(labels, num_classes, epsilon):
  onehot = np.eye(num_classes)[labels]
  return (1 - epsilon) * onehot + epsilon / (num_classes - 1) * (1 - onehot)


def ref_soft_ce(z, targets):
  return -(targets * log_softmax(z)).sum(-1)


def ref_distillation_kl(student, teacher, tau):
  log_t, log_s = log_softmax(teacher / tau), log_softmax(student / tau)
  return tau**2 * (np.exp(log_t) * (log_t - log_s)).sum(-1)


def ref_aux_logits(params, features):
  return np.asarray(features, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(
      params["bias"], np.float64)


def ref_aux_grads(params, features, labels):
  """Gradient of the mean CE of the linear head `f W + b`."""
  features = np.asarray(features, np.float64)
  residual = softmax(ref_aux_logits(params, features)) - np.eye(
      params["bias"].shape[0])[labels]
  return {"kernel": features.T @ residual / len(labels), "bias": residual.mean(0)}


# ----------------------------------------------------------------------------- helpers


def _jit_update(method, axis_name=None):

  def run(state, logits, features, labels):
    return method.update(state, {"logits": logits, "features": features}, {"label": labels},
                         step=jnp.asarray(0), axis_name=axis_name)

  return jax.jit(run)


def _data(seed, batch, num_classes=C, feature_dim=D):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
  # Scaled rows, so that forgetting to normalise the features changes the prototypes.
  features = (rng.normal(size=(batch, feature_dim)) *
              rng.uniform(0.5, 3.0, size=(batch, 1))).astype(np.float32)
  return logits, features


def _ready_state(method, seed, seen=None):
  rng = np.random.default_rng(seed)
  state = method.init(jax.random.PRNGKey(seed))
  seen = np.ones(C, bool) if seen is None else np.asarray(seen)
  return state._replace(prototypes=jnp.asarray(rng.normal(size=(C, D)), jnp.float32),
                        class_seen=jnp.asarray(seen))


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- tests


def test_init_state():
  method = ras_kd(C, D)
  state = method.init(jax.random.PRNGKey(3))
  assert isinstance(state, RASKDState)
  assert state.prototypes.shape == (C, D) and state.prototypes.dtype == jnp.float32
  assert state.class_seen.shape == (C,) and state.class_seen.dtype == jnp.bool_
  assert state.aux_params["kernel"].shape == (D, C)
  np.testing.assert_array_equal(state.prototypes, 0.0)
  np.testing.assert_array_equal(state.class_seen, False)
  np.testing.assert_array_equal(state.aux_params["bias"], 0.0)
  # Deterministic in the key, different across keys, and a usable default without one.
  np.testing.assert_array_equal(state.aux_params["kernel"],
                                method.init(jax.random.PRNGKey(3)).aux_params["kernel"])
  assert not np.allclose(state.aux_params["kernel"],
                         method.init(jax.random.PRNGKey(4)).aux_params["kernel"])
  assert method.init().aux_params["kernel"].shape == (D, C)
  # LeCun normal: standard deviation 1/sqrt(fan_in) (checked on a wide head).
  wide = ras_kd(50, 64).init(jax.random.PRNGKey(0)).aux_params["kernel"]
  np.testing.assert_allclose(np.std(np.asarray(wide)), 1 / 8, rtol=0.1)
  # 'aux_weights' keeps `prototypes` equal to the kernel's rows.
  aux_state = ras_kd(C, D, prototypes="aux_weights").init(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(aux_state.prototypes, state.aux_params["kernel"].T)


def test_ema_prototypes_fallback_then_relation_targets():
  epsilon, tau_r, momentum = 0.2, 0.5, 0.8
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, momentum=momentum)
  update = _jit_update(method)
  state = method.init(jax.random.PRNGKey(0))
  proto, seen = np.zeros((C, D)), np.zeros(C, bool)

  # Step 1: class 3 absent. Step 2: classes 1 and 2 absent, class 3 observed for the first time.
  for seed, labels in ((1, np.array([0, 1, 1, 2, 0])), (2, np.array([0, 3, 0, 3, 3]))):
    logits, features = _data(seed, len(labels))
    previous = np.asarray(state.prototypes)
    loss, state, metrics = update(state, logits, features, labels)
    # The incoming state never had every class: exclusive uniform label smoothing.
    _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)))
    assert float(metrics["ras_ready"]) == 0.0
    proto, seen = ref_ema(proto, seen, features, labels, momentum)
    _close(state.prototypes, proto)
    np.testing.assert_array_equal(state.class_seen, seen)
    absent = np.setdiff1d(np.arange(C), labels)
    # Absent classes keep their row bit for bit.
    np.testing.assert_array_equal(np.asarray(state.prototypes)[absent], previous[absent])
  np.testing.assert_allclose(metrics["ras_classes_seen"], 1.0)

  # Step 3: every class has a representative, the targets come from V.
  labels = np.array([2, 1, 3, 0, 1])
  logits, features = _data(3, len(labels))
  loss, state, metrics = update(state, logits, features, labels)
  assert float(metrics["ras_ready"]) == 1.0
  _close(loss, ref_soft_ce(logits, ref_relation_targets(proto, labels, epsilon, tau_r)))


def test_relation_targets_from_given_prototypes_and_readiness_flag():
  epsilon, tau_r = 0.3, 0.25
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r)
  update = _jit_update(method)
  labels = np.array([0, 3, 2, 2, 1, 0])
  logits, features = _data(5, len(labels))

  state = _ready_state(method, 6)
  loss, _, _ = update(state, logits, features, labels)
  expected = ref_soft_ce(logits,
                         ref_relation_targets(np.asarray(state.prototypes), labels, epsilon, tau_r))
  _close(loss, expected)
  assert not np.allclose(expected, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)))

  # One class never seen: same prototypes, but the fallback is used.
  state = _ready_state(method, 6, seen=[True, True, False, True])
  loss, _, metrics = update(state, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)))
  assert float(metrics["ras_ready"]) == 0.0


def test_aux_head_trained_with_default_sgd_momentum():
  method = ras_kd(C, D)  # optax.sgd(0.1, momentum=0.9)
  update = _jit_update(method)
  state = method.init(jax.random.PRNGKey(7))
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), state.aux_params)
  trace = None
  for seed, labels in ((8, np.array([0, 1, 2, 3, 1, 1])), (9, np.array([3, 3, 2, 0, 1, 0]))):
    logits, features = _data(seed, len(labels))
    _, state, metrics = update(state, logits, features, labels)
    aux_logits = ref_aux_logits(params, features)
    _close(metrics["ras_aux_loss"], -log_softmax(aux_logits)[np.arange(6), labels].mean())
    _close(metrics["ras_aux_accuracy"], np.mean(aux_logits.argmax(-1) == labels))
    grads = ref_aux_grads(params, features, labels)
    trace = grads if trace is None else {k: grads[k] + 0.9 * trace[k] for k in grads}
    params = {k: params[k] - 0.1 * trace[k] for k in params}
    for name in ("kernel", "bias"):
      _close(state.aux_params[name], params[name])
      _close(state.aux_opt_state[0].trace[name], trace[name])


def test_instance_term_uses_aux_logits_before_the_update():
  epsilon, tau_r, mu, tau = 0.1, 0.1, 0.7, 3.0
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, instance_weight=mu,
                  temperature=tau, aux_optimizer=optax.sgd(0.5))
  labels = np.array([1, 0, 3, 2, 2])
  logits, features = _data(10, len(labels))
  state = _ready_state(method, 11)
  loss, new_state, _ = _jit_update(method)(state, logits, features, labels)
  teacher = ref_aux_logits(state.aux_params, features)
  expected = (ref_soft_ce(logits, ref_relation_targets(np.asarray(state.prototypes), labels,
                                                       epsilon, tau_r)) +
              mu * ref_distillation_kl(logits, teacher, tau))
  _close(loss, expected, atol=1e-5)
  assert not np.allclose(new_state.aux_params["kernel"], state.aux_params["kernel"])


def test_aux_weights_prototypes():
  epsilon, tau_r = 0.2, 0.3
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, prototypes="aux_weights",
                  aux_optimizer=optax.sgd(0.3))
  update = _jit_update(method)
  labels = np.array([3, 1, 1, 0])
  logits, features = _data(12, len(labels))

  state = method.init(jax.random.PRNGKey(12))
  loss, state, _ = update(state, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)))
  np.testing.assert_array_equal(state.class_seen, [True, True, False, True])
  np.testing.assert_array_equal(state.prototypes, state.aux_params["kernel"].T)

  state = state._replace(class_seen=jnp.ones(C, bool))
  kernel = np.asarray(state.aux_params["kernel"], np.float64)
  loss, new_state, _ = update(state, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_relation_targets(kernel.T, labels, epsilon, tau_r)))
  grads = ref_aux_grads(state.aux_params, features, labels)
  _close(new_state.prototypes, (kernel - 0.3 * grads["kernel"]).T)


@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_no_gradient_through_prototypes_or_aux_head(mode):
  method = ras_kd(C, D, instance_weight=1.0, prototypes=mode)
  labels = jnp.array([0, 2, 1, 3, 3])
  logits, features = _data(13, len(labels))
  state = _ready_state(method, 14)
  batch = {"label": labels}

  def loss_of(features, state):
    loss, _, _ = method.update(state, {"logits": logits, "features": features}, batch,
                               step=0)
    return jnp.sum(loss)

  grad_features, grad_state = jax.jit(jax.grad(loss_of, argnums=(0, 1), allow_int=True))(
      jnp.asarray(features), state)
  np.testing.assert_array_equal(grad_features, 0.0)
  for leaf in jax.tree.leaves(grad_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      np.testing.assert_array_equal(leaf, 0.0)

  # A toy model producing both: its gradient is exactly that of the loss with fixed targets.
  rng = np.random.default_rng(15)
  inputs = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  params = {"body": jnp.asarray(rng.normal(size=(6, D)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(D, C)), jnp.float32)}

  def model(params):
    features = jnp.tanh(inputs @ params["body"])
    return features @ params["head"], features

  def method_loss(params):
    logits, features = model(params)
    loss, _, _ = method.update(state, {"logits": logits, "features": features}, batch,
                               step=0)
    return jnp.mean(loss)

  _, features = model(params)
  vectors = state.prototypes if mode == "ema" else state.aux_params["kernel"].T
  targets = jnp.asarray(ref_relation_targets(np.asarray(vectors), np.asarray(labels), 0.1, 0.1),
                        jnp.float32)
  teacher = features @ state.aux_params["kernel"] + state.aux_params["bias"]

  def reference_loss(params):
    logits, _ = model(params)
    log_p = jax.nn.log_softmax(logits)
    log_t, log_s = jax.nn.log_softmax(teacher / 4.0), jax.nn.log_softmax(logits / 4.0)
    kl = 16.0 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
    return jnp.mean(-jnp.sum(targets * log_p, -1) + kl)

  grads = jax.jit(jax.grad(method_loss))(params)
  expected = jax.jit(jax.grad(reference_loss))(params)
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grads[name])).max() > 0


@pytest.mark.cross_device
@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_four_devices_equal_one(mode):
  num_classes, feature_dim, batch = 3, 4, 8
  method = ras_kd(num_classes, feature_dim, prototypes=mode, instance_weight=1.0)
  rng = np.random.default_rng(16)
  params = {"body": jnp.asarray(rng.normal(size=(5, feature_dim)), jnp.float32),
            "head": jnp.asarray(rng.normal(size=(feature_dim, num_classes)), jnp.float32)}
  # Step 0 sees every class (the later steps use relation targets); step 1 misses class 2.
  label_batches = [np.array([0, 1, 2, 0, 1, 2, 0, 1]), np.array([0, 1, 1, 0, 0, 1, 1, 0]),
                   rng.integers(0, num_classes, batch)]
  input_batches = [rng.normal(size=(batch, 5)).astype(np.float32) for _ in label_batches]

  def step(state, params, inputs, labels, axis_name):

    def loss_fn(params):
      features = jnp.tanh(inputs @ params["body"])
      logits = features @ params["head"]
      loss, new_state, metrics = method.update(
          state, {"logits": logits, "features": features}, {"label": labels},
          step=jnp.asarray(0), axis_name=axis_name)
      return jnp.mean(loss), (loss, new_state, metrics)

    (_, (loss, new_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name is not None:
      grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    return loss, new_state, grads, metrics

  single = jax.jit(functools.partial(step, axis_name=None))
  sharded = jax.jit(jax.shard_map(
      functools.partial(step, axis_name="data"), mesh=_mesh(4),
      in_specs=(P(), P(), P("data"), P("data")), out_specs=(P("data"), P(), P(), P()),
      check_vma=False))

  state_1 = state_4 = method.init(jax.random.PRNGKey(17))
  for inputs, labels in zip(input_batches, label_batches):
    loss_1, state_1, grads_1, metrics_1 = single(state_1, params, inputs, labels)
    loss_4, state_4, grads_4, metrics_4 = sharded(state_4, params, inputs, labels)
    roundoff.assert_close_to_scale(loss_4, loss_1, roundoff.STEP_RTOL)
    np.testing.assert_array_equal(state_4.class_seen, state_1.class_seen)
    roundoff.assert_trees_close_to_scale((state_4, grads_4), (state_1, grads_1),
                                         roundoff.STEP_RTOL)
    for name in ("ras_ready", "ras_classes_seen", "ras_aux_accuracy"):  # counts: exact
      np.testing.assert_array_equal(metrics_4[name], metrics_1[name], err_msg=name)
    roundoff.assert_close_to_scale(metrics_4["ras_aux_loss"], metrics_1["ras_aux_loss"],
                                   roundoff.STEP_RTOL)
  assert float(metrics_1["ras_ready"]) == 1.0
  # The state really moved (so the comparison above compares something).
  assert np.abs(np.asarray(state_1.aux_opt_state[0].trace["kernel"])).max() > 0
  assert np.abs(np.asarray(state_1.prototypes)).max() > 0


def test_traced_step_does_not_retrace_and_bfloat16_inputs():
  method = ras_kd(C, D, instance_weight=1.0)
  traces = []

  @jax.jit
  def run(state, logits, features, labels, step):
    traces.append(None)
    return method.update(state, {"logits": logits, "features": features}, {"label": labels},
                         step=step)

  state = method.init(jax.random.PRNGKey(0))
  labels = jnp.array([0, 1, 2, 3])
  logits, features = _data(18, 4)
  logits, features = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(features, jnp.bfloat16)
  for step in range(3):
    loss, state, _ = run(state, logits, features, labels, jnp.asarray(step))
  assert len(traces) == 1
  assert loss.dtype == jnp.float32 and np.all(np.isfinite(loss))
  assert all(leaf.dtype in (jnp.float32, jnp.bool_, jnp.int32)
             for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("kwargs, match", [
    ({"epsilon": 1.5}, "epsilon"),
    ({"epsilon": -0.1}, "epsilon"),
    ({"relation_temperature": 0.0}, "relation_temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"prototypes": "centroids"}, "prototypes"),
    ({"instance_weight": -1.0}, "instance_weight"),
    ({"num_classes": 1}, "num_classes"),
    ({"feature_dim": 0}, "feature_dim"),
])
def test_bad_arguments(kwargs, match):
  arguments = {"num_classes": C, "feature_dim": D, **kwargs}
  with pytest.raises(ValueError, match=match):
    ras_kd(arguments.pop("num_classes"), arguments.pop("feature_dim"), **arguments)


def test_missing_or_mismatched_features():
  method = ras_kd(C, D)
  state = method.init()
  logits, features = _data(19, 2)
  labels = jnp.array([0, 1])
  with pytest.raises(ValueError, match="features"):
    method.update(state, {"logits": logits}, {"label": labels}, step=0)
  with pytest.raises(ValueError, match="feature_dim"):
    method.update(state, {"logits": logits, "features": features[:, :2]}, {"label": labels},
                  step=0)
