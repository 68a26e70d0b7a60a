"""MrKD(+TC) against numpy: snapshot timing, the ring buffer, the eval-mode teacher, TC."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import losses
from selfkd_jax.methods.base import MethodHooks
from selfkd_jax.methods.mrkd import MrKDState, mrkd
from numpy_reference import log_softmax, softmax

RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(6, 5)).astype(np.float32)
LABELS = np.array([0, 1, 2, 0, 1, 2], np.int32)
LOGITS = RNG.normal(size=(6, 3)).astype(np.float32)


def _ce(z, y):
  return -log_softmax(z)[np.arange(len(y)), y]


def _distill(z, q, t):
  """T^2 KL(q || softmax(z / T)), 0 log 0 = 0."""
  log_q = np.log(np.where(q > 0, q, 1.0))
  return t**2 * np.sum(np.where(q > 0, q * (log_q - log_softmax(z / t)), 0.0), -1)


# A hand-written "model": logits = (x - mean) @ w. Variables as {'params', 'batch_stats'}.
def _linear_forward(variables, images, *, train):
  del train
  return {"logits": (images - variables["batch_stats"]["mean"]) @ variables["params"]["w"]}


def _linear_vars(seed):
  r = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(r.normal(size=(5, 3)), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(r.normal(size=(5,)), jnp.float32)}}


def _np_linear(variables, images=IMAGES):
  return (images - np.asarray(variables["batch_stats"]["mean"])) @ np.asarray(
      variables["params"]["w"])


def _marker_vars(value):
  """Variables whose every entry equals `value`, so a slot's content names its step."""
  return jax.tree.map(lambda x: jnp.full_like(x, value), _linear_vars(0))


def _step(method, state, variables, step, logits=LOGITS, forward=_linear_forward):
  hooks = MethodHooks(forward=forward, variables=variables, images=jnp.asarray(IMAGES))
  return method.update(state, {"logits": jnp.asarray(logits)}, {"label": jnp.asarray(LABELS)},
                       step=step, hooks=hooks)


def test_plain_ce_before_the_first_snapshot():
  method = mrkd(_linear_vars(0), refresh_every=4, alpha=0.5)
  state = method.init(jax.random.PRNGKey(0))
  for step in range(4):
    loss, state, metrics = _step(method, state, _linear_vars(step), step)
    np.testing.assert_allclose(loss, _ce(LOGITS, LABELS), rtol=1e-5)  # not (1 - alpha) CE
    assert int(state.num_filled) == 0 and float(metrics["mrkd_active"]) == 0.0
    assert float(metrics["mrkd_distill"]) == 0.0
    assert float(metrics["mrkd_teacher_accuracy"]) == 0.0
  np.testing.assert_array_equal(state.snapshots["params"]["w"], 0.0)
  loss, state, metrics = _step(method, state, _linear_vars(4), 4)
  assert float(metrics["mrkd_active"]) == 1.0
  assert not np.allclose(loss, _ce(LOGITS, LABELS), rtol=1e-3)


def test_push_happens_exactly_at_multiples_of_refresh_every():
  method = mrkd(_linear_vars(0), refresh_every=3)
  state = method.init()
  assert isinstance(state, MrKDState)
  assert state.snapshots["params"]["w"].shape == (1, 5, 3)
  content = []
  for step in range(10):
    _, state, _ = _step(method, state, _marker_vars(float(step + 100)), step)
    content.append(float(state.snapshots["params"]["w"][0, 0, 0]))
    np.testing.assert_array_equal(state.snapshots["batch_stats"]["mean"][0],
                                  state.snapshots["params"]["w"][0, 0, 0])
  # Step 0 pushes nothing; steps 3, 6, 9 push the variables they see.
  assert content == [0, 0, 0, 103, 103, 103, 106, 106, 106, 109]
  assert int(state.num_filled) == 1 and int(state.next_slot) == 0


@pytest.mark.parametrize("num_snapshots,slots,next_slot",
                         [(2, [109, 112], 0), (3, [112, 106, 109], 1)])
def test_ring_buffer_keeps_the_last_k(num_snapshots, slots, next_slot):
  method = mrkd(_linear_vars(0), refresh_every=3, num_snapshots=num_snapshots)
  state = method.init()
  filled = []
  for step in range(13):
    _, state, metrics = _step(method, state, _marker_vars(float(step + 100)), step)
    filled.append(int(state.num_filled))
    assert float(metrics["mrkd_snapshots"]) == filled[-1]
  expected_filled = [min(s // 3, num_snapshots) for s in range(13)]
  assert filled == expected_filled
  np.testing.assert_array_equal(state.snapshots["params"]["w"][:, 0, 0], slots)
  np.testing.assert_array_equal(state.snapshots["batch_stats"]["mean"][:, 0], slots)
  assert int(state.next_slot) == next_slot


class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return {"logits": nn.Dense(3)(nn.relu(x))}


def _np_bnnet(variables, x):
  p, s = variables["params"], variables["batch_stats"]
  h = x @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"])
  bn, stats = p["BatchNorm_0"], s["BatchNorm_0"]
  h = (h - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  h = h * np.asarray(bn["scale"]) + np.asarray(bn["bias"])
  return np.maximum(h, 0.0) @ np.asarray(p["Dense_1"]["kernel"]) + np.asarray(
      p["Dense_1"]["bias"])


def _bn_variables(seed):
  model = _BNNet()
  variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(IMAGES), train=False)
  r = np.random.default_rng(seed + 10)
  # Running statistics far from the batch's, so eval and train mode disagree.
  stats = {"BatchNorm_0": {"mean": jnp.asarray(r.normal(size=4) * 2.0, jnp.float32),
                           "var": jnp.asarray(r.uniform(0.2, 3.0, size=4), jnp.float32)}}
  params = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(r.normal(size=x.shape), x.dtype),
                        variables["params"])
  return {"params": params, "batch_stats": stats}


def _bn_forward(variables, images, *, train):
  model = _BNNet()
  if train:
    return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
  return model.apply(variables, images, train=False)


@pytest.mark.parametrize("alpha,temperature", [(0.5, 4.0), (0.8, 2.0)])
def test_teacher_is_the_eval_forward_of_the_snapshot(alpha, temperature):
  old, new = _bn_variables(1), _bn_variables(2)
  template = jax.eval_shape(lambda: _BNNet().init(jax.random.PRNGKey(0), jnp.asarray(IMAGES),
                                                  train=False))
  method = mrkd(template, refresh_every=2, alpha=alpha, temperature=temperature)
  state = method.init()
  update = jax.jit(lambda st, v, s: _step(method, st, v, s, forward=_bn_forward))
  _, state, _ = update(state, old, 2)  # snapshot of `old` at step 2
  loss, state, metrics = update(state, new, 3)  # the student's variables no longer matter
  teacher_logits = _np_bnnet(old, IMAGES)
  train_logits = np.asarray(_bn_forward(old, jnp.asarray(IMAGES), train=True)["logits"])
  assert not np.allclose(teacher_logits, train_logits, atol=1e-2)  # the test can tell them apart
  q = softmax(teacher_logits / temperature)
  distill = _distill(LOGITS, q, temperature)
  expected = (1 - alpha) * _ce(LOGITS, LABELS) + alpha * distill
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)
  # With one snapshot and no TC the term is Hinton's KD against the snapshot's logits.
  np.testing.assert_allclose(
      loss, (1 - alpha) * _ce(LOGITS, LABELS) + alpha * np.asarray(
          losses.distillation_kl(LOGITS, teacher_logits, temperature)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["mrkd_distill"], distill.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["mrkd_teacher_accuracy"],
                             np.mean(teacher_logits.argmax(-1) == LABELS), rtol=1e-6)
  assert float(metrics["mrkd_active"]) == 1.0


def test_teacher_averages_only_the_filled_snapshots():
  first, second = _linear_vars(1), _linear_vars(2)
  method = mrkd(_linear_vars(0), refresh_every=1, num_snapshots=3, alpha=1.0, temperature=2.0)
  state = method.init()
  update = jax.jit(lambda st, v, s: _step(method, st, v, s))
  loss, state, _ = update(state, first, 1)
  q1 = softmax(_np_linear(first) / 2.0)
  np.testing.assert_allclose(loss, _distill(LOGITS, q1, 2.0), rtol=1e-4, atol=1e-6)
  loss, state, metrics = update(state, second, 2)
  q = (q1 + softmax(_np_linear(second) / 2.0)) / 2.0  # probabilities averaged, not logits
  np.testing.assert_allclose(loss, _distill(LOGITS, q, 2.0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["mrkd_teacher_accuracy"],
                             np.mean(q.argmax(-1) == LABELS), rtol=1e-6)
  assert int(state.num_filled) == 2


def _np_tc(teacher_logits, temperature, tc, beta, when):
  q = softmax(teacher_logits / temperature)
  top = q.argmax(-1)
  wrong = top != LABELS
  if tc == "mix":
    corrected = beta * np.eye(3)[LABELS] + (1 - beta) * q
  else:  # swap the logits, then soften (what the docstring says is equivalent)
    z = teacher_logits.copy()
    for i, (t, y) in enumerate(zip(top, LABELS)):
      z[i, t], z[i, y] = teacher_logits[i, y], teacher_logits[i, t]
    corrected = softmax(z / temperature)
  if when == "wrong":
    corrected = np.where(wrong[:, None], corrected, q)
  return corrected


@pytest.mark.parametrize("tc,when", [("mix", "always"), ("mix", "wrong"), ("swap", "always"),
                                     ("swap", "wrong")])
def test_teacher_correction(tc, when):
  snapshot = _linear_vars(3)
  teacher_logits = _np_linear(snapshot)
  wrong = teacher_logits.argmax(-1) != LABELS
  assert wrong.any() and not wrong.all()  # both cases are exercised
  method = mrkd(_linear_vars(0), refresh_every=1, alpha=0.7, temperature=3.0, tc=tc,
                tc_beta=0.4, tc_when=when)
  loss, _, metrics = jax.jit(lambda st: _step(method, st, snapshot, 1))(method.init())
  q = _np_tc(teacher_logits, 3.0, tc, 0.4, when)
  expected = 0.3 * _ce(LOGITS, LABELS) + 0.7 * _distill(LOGITS, q, 3.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-6)
  # The accuracy metric is the teacher's before correction.
  np.testing.assert_allclose(metrics["mrkd_teacher_accuracy"], np.mean(~wrong), rtol=1e-6)
  plain = mrkd(_linear_vars(0), refresh_every=1, alpha=0.7, temperature=3.0)
  plain_loss = jax.jit(lambda st: _step(plain, st, snapshot, 1)[0])(plain.init())
  changed = ~np.isclose(loss, plain_loss, rtol=1e-5, atol=1e-7)
  if tc == "mix" and when == "always":
    assert changed.all()
  else:  # swap is a no-op on right rows; 'wrong' leaves them alone
    np.testing.assert_array_equal(changed, wrong)


def test_no_gradient_flows_into_the_snapshot():
  # At a refresh step the snapshot IS the current parameters: the teacher must still be a
  # constant for the gradient.
  base = _linear_vars(4)
  alpha, temperature = 0.6, 2.0
  method = mrkd(base, refresh_every=5, alpha=alpha, temperature=temperature)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": base["batch_stats"]}
    # Offset so the student differs from the teacher (at q = p the KL has no gradient in q).
    logits = _linear_forward(variables, jnp.asarray(IMAGES), train=True)["logits"] + LOGITS
    hooks = MethodHooks(forward=_linear_forward, variables=variables, images=jnp.asarray(IMAGES))
    loss, _, _ = method.update(method.init(), {"logits": logits}, {"label": jnp.asarray(LABELS)},
                               step=5, hooks=hooks)
    return loss.sum()

  q = jnp.asarray(softmax(_np_linear(base) / temperature), jnp.float32)

  def reference(params):
    logits = (jnp.asarray(IMAGES) - base["batch_stats"]["mean"]) @ params["w"] + LOGITS
    return jnp.sum((1 - alpha) * losses.cross_entropy(logits, jnp.asarray(LABELS)) +
                   alpha * temperature**2 * losses.target_kl(logits, q, temperature=temperature))

  got = jax.jit(jax.grad(loss_fn))(base["params"])
  want = jax.grad(reference)(base["params"])
  np.testing.assert_allclose(got["w"], want["w"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.jit(loss_fn)(base["params"]), reference(base["params"]),
                             rtol=1e-5)


def test_jit_with_traced_step_does_not_retrace():
  traces = []
  method = mrkd(_linear_vars(0), refresh_every=3, num_snapshots=2)

  def run(state, variables, step):
    traces.append(1)
    return _step(method, state, variables, step)

  update = jax.jit(run)
  state = method.init()
  filled = []
  for step in range(8):
    _, state, _ = update(state, _marker_vars(float(step)), jnp.asarray(step, jnp.int32))
    filled.append(int(state.num_filled))
  assert filled == [0, 0, 0, 1, 1, 1, 2, 2]
  np.testing.assert_array_equal(state.snapshots["params"]["w"][:, 0, 0], [3.0, 6.0])
  assert len(traces) == 1


def test_mismatched_variables_are_rejected():
  method = mrkd(_linear_vars(0), refresh_every=1)
  bad = {"params": {"w": jnp.zeros((5, 4))}, "batch_stats": {"mean": jnp.zeros((5,))}}
  with pytest.raises(ValueError, match="shape"):
    _step(method, method.init(), bad, 1)
  with pytest.raises(ValueError, match="tree"):
    _step(method, method.init(), {"params": _linear_vars(0)["params"]}, 1)
  with pytest.raises(ValueError, match="needs hooks"):
    method.update(method.init(), {"logits": LOGITS}, {"label": LABELS}, step=1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(refresh_every=0), "refresh_every must be an integer >= 1"),
    (dict(refresh_every=2.5), "refresh_every must be an integer >= 1"),
    (dict(refresh_every=1, alpha=1.5), "alpha must be in"),
    (dict(refresh_every=1, temperature=0.0), "temperature must be > 0"),
    (dict(refresh_every=1, num_snapshots=0), "num_snapshots must be an integer >= 1"),
    (dict(refresh_every=1, tc="label"), "unknown tc"),
    (dict(refresh_every=1, tc="mix", tc_beta=-0.1), "tc_beta must be in"),
    (dict(refresh_every=1, tc_when="never"), "unknown tc_when"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mrkd(_linear_vars(0), **kwargs)
