"""DKD (warm-up), AEKT (adaptive TCKD weight, serialization head), Tf-KD_self and the network
teacher hook, against numpy. AEKT's serialization head is `heads.SerializationHead` attached
with `heads.with_heads` and trained by the caller's optimizer; its gradients are checked against
float64 numpy finite differences of the DKD terms and the chain rule."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import roundoff
from selfkd_jax import heads, methods
from selfkd_jax.methods.base import EmptyState
from selfkd_jax.methods.dkd import warmup_factor

STUDENT = np.array([[1.0, 0.0, -1.0, 0.5], [0.5, 2.0, 0.1, -0.3], [0.0, 0.2, 3.0, 1.0]],
                   np.float32)
from numpy_reference import softmax
TEACHER = np.array([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 0.5, 0.2], [1.0, 0.0, 0.5, 2.5]],
                   np.float32)
LABELS = np.array([0, 1, 3], np.int32)


def _kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _tckd_nckd(student, teacher, labels, t):
  """numpy DKD terms (each times T^2), from the paper's definitions."""
  ps, pt = softmax(student / t), softmax(teacher / t)
  rows = np.arange(len(labels))
  bs = np.stack([ps[rows, labels], 1 - ps[rows, labels]], -1)
  bt = np.stack([pt[rows, labels], 1 - pt[rows, labels]], -1)
  keep = np.ones_like(ps, bool)
  keep[rows, labels] = False
  qs = ps[keep].reshape(len(labels), -1)
  qt = pt[keep].reshape(len(labels), -1)
  qs, qt = qs / qs.sum(-1, keepdims=True), qt / qt.sum(-1, keepdims=True)
  return t * t * _kl(bt, bs), t * t * _kl(qt, qs)


def _ce(z, labels):
  return -np.log(softmax(z)[np.arange(len(labels)), labels])


def _teacher(outputs, batch, hooks):
  del outputs, batch, hooks
  return jnp.asarray(TEACHER)


def _run(method, state=None, step=0, logits=STUDENT):
  state = method.init(None) if state is None else state
  return jax.jit(lambda s, z, t: method.update(s, {"logits": z}, {"label": LABELS}, step=t))(
      state, jnp.asarray(logits), jnp.asarray(step))


def test_warmup_factor_counts_epochs_from_one_like_mdistiller():
  # 10 steps per epoch: steps 0-9 are epoch 0 (weight 1/20 as mdistiller's epoch 1), ...
  np.testing.assert_allclose([warmup_factor(s, 10, 20.0) for s in (0, 9, 90, 199, 400)],
                             [0.05, 0.05, 0.5, 1.0, 1.0], rtol=1e-6)
  assert float(warmup_factor(0, None, 0.0)) == 1.0


def test_epoch_schedules_need_steps_per_epoch():
  for build in (lambda **kw: methods.dkd(_teacher, **kw),
                lambda **kw: methods.aekt(_teacher, **kw)):
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
      build()
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
      build(steps_per_epoch=0)
    build(warmup_epochs=0)  # no schedule, nothing to count


@pytest.mark.parametrize("step,expected_warmup", [(0, 0.25), (2, 0.25), (3, 0.5), (17, 1.0)])
def test_dkd_is_ce_plus_warmed_up_alpha_tckd_beta_nckd(step, expected_warmup):
  tckd, nckd = _tckd_nckd(STUDENT, TEACHER, LABELS, 2.0)
  expected = 0.5 * _ce(STUDENT, LABELS) + expected_warmup * (1.5 * tckd + 3.0 * nckd)
  method = methods.dkd(_teacher, steps_per_epoch=3, alpha=1.5, beta=3.0, temperature=2.0,
                       warmup_epochs=4, ce_weight=0.5)
  loss, _, metrics = _run(method, step=step)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["dkd_warmup"], expected_warmup)


def test_aekt_without_head_and_constant_weight_is_dkd():
  dkd = methods.dkd(_teacher, warmup_epochs=0)
  aekt = methods.aekt(_teacher, warmup_epochs=0, weight_fn="constant",
                      serialization_head=False)
  np.testing.assert_allclose(_run(aekt)[0], _run(dkd)[0], rtol=1e-6)


def test_aekt_adaptive_weight_is_the_clipped_target_probability_ratio():
  t = 4.0
  ps, pt = softmax(STUDENT / t), softmax(TEACHER / t)
  rows = np.arange(3)
  weight = np.clip(pt[rows, LABELS] / ps[rows, LABELS], 0, 1.16)
  assert weight.min() < 1.16 and weight.max() == pytest.approx(1.16)  # both regimes are exercised
  tckd, nckd = _tckd_nckd(STUDENT, TEACHER, LABELS, t)
  expected = _ce(STUDENT, LABELS) + weight * 1.0 * tckd + 8.0 * nckd
  method = methods.aekt(_teacher, warmup_epochs=0, max_weight=1.16, serialization_head=False)
  loss, _, metrics = _run(method)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["aekt_weight"], weight.mean(), rtol=1e-5)


class _Linear(nn.Module):
  """The classifier `z = x K + c` as the backbone (one Dense, so its gradient is x^T dL/dz)."""

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    return {"logits": nn.Dense(4, name="classifier", precision=jax.lax.Precision.HIGHEST)(x)}


_WITH_HEAD = heads.with_heads(_Linear(), heads.SerializationHead(4))


def _params_with_head(kernel, bias):
  """The wrapped model's params: backbone K = I, c = 0 (so z = x exactly), head W, b."""
  params = _WITH_HEAD.init(jax.random.PRNGKey(0), jnp.asarray(STUDENT))["params"]
  params["backbone"] = {"classifier": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
  params["heads_0"] = {"serialization": {"kernel": jnp.asarray(kernel, jnp.float32),
                                         "bias": jnp.asarray(bias, jnp.float32)}}
  return params


def _numeric_grad(f, x, h=1e-6):
  """Central differences of a float64 scalar function of an array."""
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[i] = h
    grad[i] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def test_aekt_is_stateless_and_the_head_starts_as_the_identity():
  method = methods.aekt(_teacher, warmup_epochs=0)
  assert method.init() == EmptyState() and method.init(jax.random.PRNGKey(1)) == EmptyState()
  params = _WITH_HEAD.init(jax.random.PRNGKey(3), jnp.asarray(STUDENT))["params"]
  assert set(params) == {"backbone", "heads_0"}
  np.testing.assert_array_equal(params["heads_0"]["serialization"]["kernel"], np.eye(4))
  np.testing.assert_array_equal(params["heads_0"]["serialization"]["bias"], np.zeros(4))
  outputs = _WITH_HEAD.apply({"params": params}, jnp.asarray(STUDENT))
  assert set(outputs) == {"logits", "serialized_logits"}
  # A no-op at init: the loss is exactly that of serialization_head=False on the same logits
  # (identity matmul and zero bias are exact in float32), for both weight functions.
  for weight_fn in ("ratio", "constant"):
    with_head = methods.aekt(_teacher, warmup_epochs=0, weight_fn=weight_fn)
    without = methods.aekt(_teacher, warmup_epochs=0, weight_fn=weight_fn,
                           serialization_head=False)
    batch = {"label": LABELS}
    loss, state, metrics = jax.jit(lambda o: with_head.update(EmptyState(), o, batch, step=0))(
        outputs)
    expected, _, expected_metrics = jax.jit(lambda o: without.update(
        EmptyState(), o, batch, step=0))({"logits": outputs["logits"]})
    np.testing.assert_array_equal(loss, expected)
    assert state == EmptyState()
    for name in expected_metrics:
      np.testing.assert_array_equal(metrics[name], expected_metrics[name], err_msg=name)


def test_aekt_head_gets_the_distillation_and_ce_stays_on_the_classifier():
  # A head of 2·I: CE sees z, the distillation terms see 2z.
  method = methods.aekt(_teacher, warmup_epochs=0, weight_fn="constant")
  outputs = _WITH_HEAD.apply({"params": _params_with_head(2 * np.eye(4), np.zeros(4))},
                             jnp.asarray(STUDENT))
  np.testing.assert_array_equal(outputs["logits"], STUDENT)
  tckd, nckd = _tckd_nckd(2 * STUDENT, TEACHER, LABELS, 4.0)
  loss, _, _ = method.update(EmptyState(), outputs, {"label": LABELS}, step=0)
  np.testing.assert_allclose(loss, _ce(STUDENT, LABELS) + tckd + 8 * nckd, rtol=1e-5)


def test_one_gradient_trains_head_on_distillation_and_classifier_on_ce_through_the_head():
  """One `jax.grad` of the mean loss over `{'backbone', 'heads_0'}` (adaptive weight, warm-up
  0.5, a head that is not the identity): the head's gradient is that of the distillation term
  w.r.t. W, b with the logits held fixed (no CE); the classifier's is CE's on z plus the
  distillation's through the head, dL/dz = (softmax(z) - e_y)/B + dD/ds W^T. One SGD step of
  the caller's optimizer moves the head by -lr times its gradient."""
  t, alpha, beta, max_weight, warmup, lr = 4.0, 1.5, 3.0, 1.16, 0.5, 0.1
  method = methods.aekt(_teacher, steps_per_epoch=3, warmup_epochs=4, alpha=alpha, beta=beta,
                        temperature=t, max_weight=max_weight)
  rng = np.random.default_rng(0)
  kernel = np.eye(4) + 0.3 * rng.normal(size=(4, 4))
  bias = 0.2 * rng.normal(size=4)
  params = _params_with_head(kernel, bias)
  kernel = np.asarray(params["heads_0"]["serialization"]["kernel"], np.float64)
  bias = np.asarray(params["heads_0"]["serialization"]["bias"], np.float64)
  x = jnp.asarray(STUDENT)

  def loss_fn(params):
    outputs = _WITH_HEAD.apply({"params": params}, x)
    loss, _, metrics = method.update(EmptyState(), outputs, {"label": LABELS}, step=3)
    return jnp.mean(loss), metrics

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  # float64 references: the weight from the classifier's z, the DKD terms on s = z W + b.
  z = STUDENT.astype(np.float64)
  rows = np.arange(3)
  weight = np.clip(softmax(TEACHER / t)[rows, LABELS] / softmax(z / t)[rows, LABELS], 0,
                   max_weight)
  assert weight.min() < max_weight and weight.max() == pytest.approx(max_weight)

  def distill(s):
    tckd, nckd = _tckd_nckd(s, TEACHER, LABELS, t)
    return warmup * (alpha * weight * tckd + beta * nckd)

  s = z @ kernel + bias
  np.testing.assert_allclose(loss, np.mean(_ce(z, LABELS) + distill(s)), rtol=1e-5)
  np.testing.assert_allclose(metrics["aekt_distill"], distill(s).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["aekt_weight"], weight.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["aekt_warmup"], warmup)

  grad_s = _numeric_grad(lambda s: np.mean(distill(s)), s)  # dD/ds, logits fixed
  head_grad = {"kernel": z.T @ grad_s, "bias": grad_s.sum(0)}
  grad_z = (softmax(z) - np.eye(4)[LABELS]) / 3 + grad_s @ kernel.T
  backbone_grad = {"kernel": STUDENT.T.astype(np.float64) @ grad_z, "bias": grad_z.sum(0)}
  for name in ("kernel", "bias"):
    roundoff.assert_close_to_scale(grads["heads_0"]["serialization"][name], head_grad[name],
                                   roundoff.STEP_RTOL, err_msg=f"head {name}")
    roundoff.assert_close_to_scale(grads["backbone"]["classifier"][name], backbone_grad[name],
                                   roundoff.STEP_RTOL, err_msg=f"backbone {name}")
  # CE on the head's output instead would add (softmax(s) - e_y)/B to dL/ds: far outside.
  ce_on_head = z.T @ ((softmax(s) - np.eye(4)[LABELS]) / 3)
  assert np.abs(ce_on_head).max() > 1e3 * roundoff.STEP_RTOL * np.abs(head_grad["kernel"]).max()

  tx = optax.sgd(lr)
  updates, _ = tx.update(grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  stepped = {"kernel": kernel - lr * head_grad["kernel"], "bias": bias - lr * head_grad["bias"]}
  for name in ("kernel", "bias"):
    roundoff.assert_close_to_scale(new_params["heads_0"]["serialization"][name], stepped[name],
                                   roundoff.STEP_RTOL, err_msg=name)
  # The head's step lowers the distillation of the same batch, logits held fixed.
  head_only = {"backbone": params["backbone"], "heads_0": new_params["heads_0"]}
  assert float(loss_fn(head_only)[1]["aekt_distill"]) < float(metrics["aekt_distill"])


def test_aekt_without_the_head_refuses_in_one_line():
  method = methods.aekt(_teacher, warmup_epochs=0)
  with pytest.raises(ValueError, match="'serialized_logits'.*SerializationHead") as caught:
    method.update(EmptyState(), {"logits": jnp.asarray(STUDENT)}, {"label": LABELS}, step=0)
  assert "\n" not in str(caught.value)
  # The head built for another number of classes refuses too.
  with pytest.raises(ValueError, match="SerializationHead.*3") as caught:
    heads.with_heads(_Linear(), heads.SerializationHead(3)).init(jax.random.PRNGKey(0),
                                                                 jnp.asarray(STUDENT))
  assert "\n" not in str(caught.value)


@pytest.mark.parametrize("variant,weight", [("faithful", 0.8 * 50 / 4), ("paper", 0.8)])
def test_tfkd_self_weights_the_tempered_kl(variant, weight):
  t = 3.0
  kl = t * t * _kl(softmax(TEACHER / t), softmax(STUDENT / t))
  expected = 0.2 * _ce(STUDENT, LABELS) + weight * kl
  method = methods.tfkd_self(_teacher, alpha=0.8, temperature=t, multiplier=50.0,
                             variant=variant)
  np.testing.assert_allclose(_run(method)[0], expected, rtol=1e-5)


def test_network_teacher_runs_the_hook_on_the_images_and_refuses_without_one():
  images = jnp.asarray(TEACHER * 0.5)
  hooks = methods.MethodHooks(images=images, teacher=lambda x: {"logits": 2.0 * x})
  got = methods.network_teacher()({}, {}, hooks)
  np.testing.assert_allclose(got, TEACHER)
  with pytest.raises(ValueError, match="hooks.teacher"):
    methods.network_teacher()({}, {}, methods.MethodHooks())


@pytest.mark.parametrize("build,message", [
    (lambda: methods.dkd(_teacher, temperature=0.0), "temperature"),
    (lambda: methods.dkd(_teacher, warmup_epochs=-1), "warmup_epochs"),
    (lambda: methods.aekt(_teacher, steps_per_epoch=1, weight_fn="square"), "weight_fn"),
    (lambda: methods.aekt(_teacher, steps_per_epoch=1, max_weight=0.0), "max_weight"),
    (lambda: methods.tfkd_self(_teacher, variant="x"), "variant"),
])
def test_bad_arguments_are_one_line_errors(build, message):
  with pytest.raises(ValueError, match=message):
    build()
