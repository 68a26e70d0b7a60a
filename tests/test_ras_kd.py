"""RAS-KD method transform against float64 numpy references, and 1 device against 4.

The references (EMA prototypes, relation matrix, targets, the auxiliary head's cross-entropy
and its gradient, the instance-level KL, SGD with momentum) are written directly from the
formulas in the method's docstring and share no code with the library. The auxiliary classifier
is `heads.AuxClassifier` attached with `heads.with_heads`, trained by the caller's optimizer.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax import heads
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


def ref_ce(z, labels):
  return -log_softmax(z)[np.arange(len(labels)), labels]


def ref_distillation_kl(student, teacher, tau):
  log_t, log_s = log_softmax(teacher / tau), log_softmax(student / tau)
  return tau**2 * (np.exp(log_t) * (log_t - log_s)).sum(-1)


def ref_aux_logits(head, features):
  """The linear head `f W + b`; `head` is `AuxClassifier`'s params `{'classifier': ...}`."""
  dense = head["classifier"]
  return (np.asarray(features, np.float64) @ np.asarray(dense["kernel"], np.float64)
          + np.asarray(dense["bias"], np.float64))


def ref_aux_grads(head, features, labels):
  """Gradient of the mean CE of the linear head `f W + b` over the batch."""
  features = np.asarray(features, np.float64)
  residual = softmax(ref_aux_logits(head, features)) - np.eye(
      head["classifier"]["bias"].shape[0])[labels]
  return {"classifier": {"kernel": features.T @ residual / len(labels),
                         "bias": residual.mean(0)}}


# ----------------------------------------------------------------------------- models


class Given(nn.Module):
  """A parameter-free backbone returning the given `(logits, features)`."""

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    logits, features = x
    return {"logits": logits, "features": features}


class Toy(nn.Module):
  """features = tanh(x B), logits = features H: a backbone with parameters on both sides of
  the features, so a gradient reaching the features from the head's CE would show in `body`."""
  num_classes: int = C
  feature_dim: int = D

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    features = jnp.tanh(nn.Dense(self.feature_dim, use_bias=False, name="body",
                                 precision=jax.lax.Precision.HIGHEST)(x))
    logits = nn.Dense(self.num_classes, use_bias=False, name="classifier",
                      precision=jax.lax.Precision.HIGHEST)(features)
    return {"logits": logits, "features": features}


GIVEN = heads.with_heads(Given(), heads.AuxClassifier(C))


# ----------------------------------------------------------------------------- helpers


def _head(seed):
  """`AuxClassifier(C)`'s params for width D, from `with_heads`' init (LeCun normal, zero bias);
  the bias is made non-zero so that a reference ignoring it fails."""
  x = (jnp.zeros((1, C)), jnp.zeros((1, D)))
  head = GIVEN.init(jax.random.PRNGKey(seed), x)["params"]["heads_0"]
  bias = np.random.default_rng(seed).normal(size=C) * 0.3
  return {"classifier": {"kernel": head["classifier"]["kernel"],
                         "bias": jnp.asarray(bias, jnp.float32)}}


def _jit_update(method, axis_name=None):
  """`run(state, head, logits, features, labels)`: the head's forward, then `update`."""

  def run(state, head, logits, features, labels):
    outputs = GIVEN.apply({"params": {"heads_0": head}}, (logits, features))
    return method.update(state, outputs, {"label": labels}, step=jnp.asarray(0),
                         axis_name=axis_name)

  return jax.jit(run)


def _data(seed, batch, num_classes=C, feature_dim=D):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
  # Scaled rows, so that forgetting to normalise the features changes the prototypes.
  features = (rng.normal(size=(batch, feature_dim)) *
              rng.uniform(0.5, 3.0, size=(batch, 1))).astype(np.float32)
  return logits, features


def _ready_state(method, seed, seen=None):
  """Random 'ema' prototypes (an 'aux_weights' state keeps its [C, 0]) and `class_seen`."""
  rng = np.random.default_rng(seed)
  state = method.init()
  seen = np.ones(C, bool) if seen is None else np.asarray(seen)
  if state.prototypes.shape[1]:
    state = state._replace(prototypes=jnp.asarray(rng.normal(size=(C, D)), jnp.float32))
  return state._replace(class_seen=jnp.asarray(seen))


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _trees_close(actual, expected, rtol=roundoff.STEP_RTOL):
  """Leaf by leaf, each to the scale of its expected value (gradients have near-zero entries)."""
  assert jax.tree.structure(jax.tree.map(np.asarray, actual)) == jax.tree.structure(
      jax.tree.map(np.asarray, expected))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    roundoff.assert_close_to_scale(a, b, rtol, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- tests


def test_init_state_and_the_head():
  method = ras_kd(C, D)
  state = method.init(jax.random.PRNGKey(3))
  assert isinstance(state, RASKDState) and set(state._fields) == {"prototypes", "class_seen"}
  assert state.prototypes.shape == (C, D) and state.prototypes.dtype == jnp.float32
  assert state.class_seen.shape == (C,) and state.class_seen.dtype == jnp.bool_
  np.testing.assert_array_equal(state.prototypes, 0.0)
  np.testing.assert_array_equal(state.class_seen, False)
  # Nothing random in the state any more: the key does not matter, and none is needed.
  for other in (method.init(jax.random.PRNGKey(4)), method.init()):
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)
  # 'aux_weights' reads the class vectors from the head's kernel: the state keeps [C, 0].
  aux_state = ras_kd(C, D, prototypes="aux_weights").init()
  assert aux_state.prototypes.shape == (C, 0) and aux_state.prototypes.dtype == jnp.float32
  assert aux_state.class_seen.shape == (C,)

  # The head: a Dense [D, C] + [C] under 'heads_0', initialised like nn.Dense from the key.
  x = (jnp.zeros((2, C)), jnp.zeros((2, D)))
  params = GIVEN.init(jax.random.PRNGKey(3), x)["params"]
  assert set(params) == {"heads_0"}  # the given backbone has none
  dense = params["heads_0"]["classifier"]
  assert dense["kernel"].shape == (D, C) and dense["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(dense["bias"], np.zeros(C))
  np.testing.assert_array_equal(
      dense["kernel"], GIVEN.init(jax.random.PRNGKey(3), x)["params"]["heads_0"]["classifier"][
          "kernel"])
  assert not np.allclose(
      dense["kernel"],
      GIVEN.init(jax.random.PRNGKey(4), x)["params"]["heads_0"]["classifier"]["kernel"])
  # LeCun normal: standard deviation 1/sqrt(fan_in) (checked on a wide head).
  wide = heads.with_heads(Given(), heads.AuxClassifier(50)).init(
      jax.random.PRNGKey(0), (jnp.zeros((1, 50)), jnp.zeros((1, 64))))
  np.testing.assert_allclose(np.std(np.asarray(wide["params"]["heads_0"]["classifier"]["kernel"])),
                             1 / 8, rtol=0.1)
  # It adds exactly aux_logits = f W + b and aux_kernel = W.
  head = _head(5)
  logits, features = _data(5, 6)
  outputs = GIVEN.apply({"params": {"heads_0": head}}, (logits, features))
  assert set(outputs) == {"logits", "features", "aux_logits", "aux_kernel"}
  np.testing.assert_array_equal(outputs["aux_kernel"], head["classifier"]["kernel"])
  assert outputs["aux_logits"].shape == (6, C) and outputs["aux_logits"].dtype == jnp.float32
  _close(outputs["aux_logits"], ref_aux_logits(head, features))


def test_ema_prototypes_fallback_then_relation_targets():
  epsilon, tau_r, momentum = 0.2, 0.5, 0.8
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, momentum=momentum)
  update = _jit_update(method)
  head = _head(0)
  state = method.init()
  proto, seen = np.zeros((C, D)), np.zeros(C, bool)

  # Step 1: class 3 absent. Step 2: classes 1 and 2 absent, class 3 observed for the first time.
  for seed, labels in ((1, np.array([0, 1, 1, 2, 0])), (2, np.array([0, 3, 0, 3, 3]))):
    logits, features = _data(seed, len(labels))
    previous = np.asarray(state.prototypes)
    loss, state, metrics = update(state, head, logits, features, labels)
    # The incoming state never had every class: exclusive uniform label smoothing, plus the
    # head's cross-entropy.
    _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon))
           + ref_ce(ref_aux_logits(head, features), labels))
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
  loss, state, metrics = update(state, head, logits, features, labels)
  assert float(metrics["ras_ready"]) == 1.0
  _close(loss, ref_soft_ce(logits, ref_relation_targets(proto, labels, epsilon, tau_r))
         + ref_ce(ref_aux_logits(head, features), labels))


def test_relation_targets_from_given_prototypes_and_readiness_flag():
  epsilon, tau_r = 0.3, 0.25
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r)
  update = _jit_update(method)
  head = _head(6)
  labels = np.array([0, 3, 2, 2, 1, 0])
  logits, features = _data(5, len(labels))
  aux_ce = ref_ce(ref_aux_logits(head, features), labels)

  state = _ready_state(method, 6)
  loss, _, _ = update(state, head, logits, features, labels)
  expected = ref_soft_ce(logits,
                         ref_relation_targets(np.asarray(state.prototypes), labels, epsilon, tau_r))
  _close(loss, expected + aux_ce)
  assert not np.allclose(expected, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)))

  # One class never seen: same prototypes, but the fallback is used.
  state = _ready_state(method, 6, seen=[True, True, False, True])
  loss, _, metrics = update(state, head, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon)) + aux_ce)
  assert float(metrics["ras_ready"]) == 0.0


@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_one_gradient_trains_the_head_on_its_ce_and_the_backbone_without_it(mode):
  """The contract: one `jax.grad` of the mean loss over `{'backbone', 'heads_0'}`. The head's
  gradient is that of mean CE(aux_logits, y) alone (the instance term's teacher and the class
  vectors are stop-gradient); the backbone's is that of the loss with fixed targets and teacher
  and without the head's CE (the head reads stop-gradient features). One SGD step on the
  combined params then moves the head by exactly `-lr` times that gradient."""
  epsilon, tau_r, mu, tau, lr = 0.1, 0.1, 0.7, 3.0, 0.05
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, instance_weight=mu,
                  temperature=tau, prototypes=mode)
  model = heads.with_heads(Toy(), heads.AuxClassifier(C))
  rng = np.random.default_rng(15)
  inputs = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  labels = jnp.array([0, 2, 1, 3, 3])
  params = model.init(jax.random.PRNGKey(15), inputs)["params"]
  assert set(params) == {"backbone", "heads_0"}
  params["heads_0"] = _head(15)  # a non-zero bias
  state = _ready_state(method, 14)

  def loss_fn(params):
    outputs = model.apply({"params": params}, inputs)
    loss, _, metrics = method.update(state, outputs, {"label": labels}, step=0)
    return jnp.mean(loss), metrics

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  outputs = model.apply({"params": params}, inputs)
  features, logits = np.asarray(outputs["features"]), np.asarray(outputs["logits"])
  head = params["heads_0"]
  aux_logits = ref_aux_logits(head, features)
  vectors = (np.asarray(state.prototypes) if mode == "ema"
             else np.asarray(head["classifier"]["kernel"], np.float64).T)
  targets = ref_relation_targets(vectors, np.asarray(labels), epsilon, tau_r)
  aux_ce = ref_ce(aux_logits, np.asarray(labels))
  _close(loss, np.mean(ref_soft_ce(logits, targets) + aux_ce
                       + mu * ref_distillation_kl(logits, aux_logits, tau)))
  _close(metrics["ras_aux_loss"], aux_ce.mean())

  # The head: mean CE's gradient, by hand.
  expected_head = ref_aux_grads(head, features, np.asarray(labels))
  _trees_close(grads["heads_0"], expected_head)

  # The backbone: the loss with targets and teacher fixed, no head (reference in jnp).
  targets32, teacher32 = jnp.asarray(targets, jnp.float32), jnp.asarray(aux_logits, jnp.float32)

  def reference_loss(backbone):
    z = Toy().apply({"params": backbone}, inputs)["logits"]
    log_t, log_s = jax.nn.log_softmax(teacher32 / tau), jax.nn.log_softmax(z / tau)
    kl = tau**2 * jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
    return jnp.mean(-jnp.sum(targets32 * jax.nn.log_softmax(z), -1) + mu * kl)

  expected_backbone = jax.jit(jax.grad(reference_loss))(params["backbone"])
  _trees_close(grads["backbone"], expected_backbone)
  for leaf in jax.tree.leaves(grads):
    assert np.abs(np.asarray(leaf)).max() > 0

  # One step of the caller's optimizer on the combined params.
  tx = optax.sgd(lr)
  updates, _ = tx.update(grads, tx.init(params), params)
  new_head = optax.apply_updates(params, updates)["heads_0"]
  _trees_close(new_head, jax.tree.map(lambda w, g: np.asarray(w, np.float64) - lr * g,
                                      head, expected_head))


def test_callers_sgd_momentum_trains_the_head_on_its_ce():
  """Two train steps of the wrapped model with `optax.sgd(0.1, momentum=0.9)`: the head follows
  SGD with momentum on its CE gradient (features of each step from the moving backbone), and
  the metrics are those of the head before the step."""
  method = ras_kd(C, D)
  model = heads.with_heads(Toy(), heads.AuxClassifier(C))
  tx = optax.sgd(0.1, momentum=0.9)
  rng = np.random.default_rng(7)
  params = model.init(jax.random.PRNGKey(7), jnp.zeros((1, 6)))["params"]
  opt_state = tx.init(params)
  state = method.init()

  @jax.jit
  def train_step(params, opt_state, state, inputs, labels):

    def loss_fn(params):
      outputs = model.apply({"params": params}, inputs)
      loss, new_state, metrics = method.update(state, outputs, {"label": labels}, step=0)
      return jnp.mean(loss), (new_state, metrics, outputs["features"])

    (_, (state, metrics, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, metrics, features

  head = jax.tree.map(lambda x: np.asarray(x, np.float64), params["heads_0"])
  trace = None
  for labels in (np.array([0, 1, 2, 3, 1, 1]), np.array([3, 3, 2, 0, 1, 0])):
    inputs = rng.normal(size=(6, 6)).astype(np.float32)
    params, opt_state, state, metrics, features = train_step(params, opt_state, state, inputs,
                                                             labels)
    aux_logits = ref_aux_logits(head, features)
    _close(metrics["ras_aux_loss"], ref_ce(aux_logits, labels).mean())
    _close(metrics["ras_aux_accuracy"], np.mean(aux_logits.argmax(-1) == labels))
    grads = ref_aux_grads(head, features, labels)
    trace = grads if trace is None else jax.tree.map(lambda g, t: g + 0.9 * t, grads, trace)
    head = jax.tree.map(lambda w, t: w - 0.1 * t, head, trace)
    _trees_close(params["heads_0"], head)
    _trees_close(opt_state[0].trace["heads_0"], trace)


def test_instance_term_uses_the_heads_logits_of_the_same_forward():
  epsilon, tau_r, mu, tau = 0.1, 0.1, 0.7, 3.0
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, instance_weight=mu,
                  temperature=tau)
  labels = np.array([1, 0, 3, 2, 2])
  logits, features = _data(10, len(labels))
  head = _head(11)
  state = _ready_state(method, 11)
  loss, _, _ = _jit_update(method)(state, head, logits, features, labels)
  teacher = ref_aux_logits(head, features)
  without = (ref_soft_ce(logits, ref_relation_targets(np.asarray(state.prototypes), labels,
                                                      epsilon, tau_r)) + ref_ce(teacher, labels))
  instance = mu * ref_distillation_kl(logits, teacher, tau)
  _close(loss, without + instance, atol=1e-5)
  assert np.min(instance) > 1e-2  # the term is really there


def test_aux_weights_prototypes():
  epsilon, tau_r, lr = 0.2, 0.3, 0.3
  method = ras_kd(C, D, epsilon=epsilon, relation_temperature=tau_r, prototypes="aux_weights")
  update = _jit_update(method)
  labels = np.array([3, 1, 1, 0])
  logits, features = _data(12, len(labels))
  head = _head(12)

  state = method.init()
  loss, state, _ = update(state, head, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_exclusive_ls(labels, C, epsilon))
         + ref_ce(ref_aux_logits(head, features), labels))
  np.testing.assert_array_equal(state.class_seen, [True, True, False, True])
  assert state.prototypes.shape == (C, 0)

  state = state._replace(class_seen=jnp.ones(C, bool))
  kernel = np.asarray(head["classifier"]["kernel"], np.float64)
  loss, new_state, _ = update(state, head, logits, features, labels)
  _close(loss, ref_soft_ce(logits, ref_relation_targets(kernel.T, labels, epsilon, tau_r))
         + ref_ce(ref_aux_logits(head, features), labels))
  assert new_state.prototypes.shape == (C, 0)

  # After the caller's SGD step on the head, the targets follow the stepped kernel's rows.
  grads = ref_aux_grads(head, features, labels)
  stepped = jax.tree.map(lambda w, g: jnp.asarray(np.asarray(w, np.float64) - lr * g,
                                                  jnp.float32), head, grads)
  loss, _, _ = update(new_state, stepped, logits, features, labels)
  new_kernel = kernel - lr * grads["classifier"]["kernel"]
  relation_ce = ref_soft_ce(logits, ref_relation_targets(new_kernel.T, labels, epsilon, tau_r))
  _close(loss, relation_ce + ref_ce(ref_aux_logits(stepped, features), labels))
  assert not np.allclose(relation_ce,
                         ref_soft_ce(logits, ref_relation_targets(kernel.T, labels, epsilon,
                                                                  tau_r)), rtol=1e-4)


@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_no_gradient_through_features_prototypes_or_kernel(mode):
  """Called directly on outputs: nothing reaches the features, the state or the kernel; the
  head's logits get exactly CE's gradient (the instance term's teacher is stop-gradient)."""
  method = ras_kd(C, D, instance_weight=1.0, prototypes=mode)
  labels = jnp.array([0, 2, 1, 3, 3])
  logits, features = _data(13, len(labels))
  head = _head(13)
  aux_logits = jnp.asarray(ref_aux_logits(head, features), jnp.float32)
  state = _ready_state(method, 14)

  def loss_of(features, aux_logits, aux_kernel, state):
    outputs = {"logits": logits, "features": features, "aux_logits": aux_logits,
               "aux_kernel": aux_kernel}
    loss, _, _ = method.update(state, outputs, {"label": labels}, step=0)
    return jnp.sum(loss)

  grad_features, grad_aux, grad_kernel, grad_state = jax.jit(
      jax.grad(loss_of, argnums=(0, 1, 2, 3), allow_int=True))(
          jnp.asarray(features), aux_logits, head["classifier"]["kernel"], state)
  np.testing.assert_array_equal(grad_features, 0.0)
  np.testing.assert_array_equal(grad_kernel, 0.0)
  for leaf in jax.tree.leaves(grad_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      np.testing.assert_array_equal(leaf, 0.0)
  expected = softmax(np.asarray(aux_logits, np.float64)) - np.eye(C)[np.asarray(labels)]
  roundoff.assert_close_to_scale(grad_aux, expected, roundoff.STEP_RTOL)


@pytest.mark.cross_device
@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_four_devices_equal_one(mode):
  num_classes, feature_dim, batch = 3, 4, 8
  method = ras_kd(num_classes, feature_dim, prototypes=mode, instance_weight=1.0)
  model = heads.with_heads(Toy(num_classes, feature_dim), heads.AuxClassifier(num_classes))
  rng = np.random.default_rng(16)
  params = model.init(jax.random.PRNGKey(16), jnp.zeros((1, 5)))["params"]
  # Step 0 sees every class (the later steps use relation targets); step 1 misses class 2.
  label_batches = [np.array([0, 1, 2, 0, 1, 2, 0, 1]), np.array([0, 1, 1, 0, 0, 1, 1, 0]),
                   rng.integers(0, num_classes, batch)]
  input_batches = [rng.normal(size=(batch, 5)).astype(np.float32) for _ in label_batches]

  def step(state, params, inputs, labels, axis_name):

    def loss_fn(params):
      outputs = model.apply({"params": params}, inputs)
      loss, new_state, metrics = method.update(state, outputs, {"label": labels},
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

  state_1 = state_4 = method.init()
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
  # What is compared is not trivially zero: the head and backbone gradients, the prototypes.
  for leaf in jax.tree.leaves(grads_1):
    assert np.abs(np.asarray(leaf)).max() > 0
  assert state_1.prototypes.shape == ((num_classes, feature_dim) if mode == "ema"
                                      else (num_classes, 0))
  if mode == "ema":
    assert np.abs(np.asarray(state_1.prototypes)).max() > 0


@pytest.mark.parametrize("mode", ["ema", "aux_weights"])
def test_traced_step_does_not_retrace_and_bfloat16_inputs(mode):
  method = ras_kd(C, D, instance_weight=1.0, prototypes=mode)
  traces = []

  @jax.jit
  def run(state, head, logits, features, labels, step):
    traces.append(None)
    outputs = GIVEN.apply({"params": {"heads_0": head}}, (logits, features))
    return method.update(state, outputs, {"label": labels}, step=step)

  state = method.init()
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  labels = jnp.array([0, 1, 2, 3])
  logits, features = _data(18, 4)
  logits, features = jnp.asarray(logits, jnp.bfloat16), jnp.asarray(features, jnp.bfloat16)
  for step in range(3):
    loss, state, _ = run(state, _head(step), logits, features, labels, jnp.asarray(step))
  assert len(traces) == 1
  assert loss.dtype == jnp.float32 and loss.shape == (4,) and np.all(np.isfinite(loss))
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == shapes


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
  with pytest.raises(ValueError, match=match) as error:
    ras_kd(arguments.pop("num_classes"), arguments.pop("feature_dim"), **arguments)
  assert "\n" not in str(error.value)


def test_missing_outputs_or_mismatched_features_are_one_line_errors():
  state = ras_kd(C, D).init()
  logits, features = _data(19, 2)
  labels = {"label": jnp.array([0, 1])}
  outputs = GIVEN.apply({"params": {"heads_0": _head(19)}}, (logits, features))

  def error(method, outputs, match):
    with pytest.raises(ValueError, match=match) as caught:
      method.update(method.init(), outputs, labels, step=0)
    assert "\n" not in str(caught.value), str(caught.value)

  without = lambda *keys: {k: v for k, v in outputs.items() if k not in keys}
  error(ras_kd(C, D), without("features"), "'features'")
  # No head attached: the error names the missing key and the head that adds it.
  error(ras_kd(C, D), without("aux_logits", "aux_kernel"), "'aux_logits'.*AuxClassifier")
  error(ras_kd(C, D, prototypes="aux_weights"), without("aux_kernel"),
        "'aux_kernel'.*AuxClassifier")
  ras_kd(C, D).update(state, without("aux_kernel"), labels, step=0)  # 'ema' does not need it
  error(ras_kd(C, D), {**outputs, "features": features[:, :2]}, "feature_dim")

  # The head itself refuses a backbone without features, in one line.
  class LogitsOnly(nn.Module):

    @nn.compact
    def __call__(self, x, *, train=False):
      del train
      return {"logits": x}

  with pytest.raises(ValueError, match="AuxClassifier.*'features'") as caught:
    heads.with_heads(LogitsOnly(), heads.AuxClassifier(C)).init(jax.random.PRNGKey(0), logits)
  assert "\n" not in str(caught.value)
