"""DKD (warm-up), AEKT (adaptive TCKD weight, serialization head), Tf-KD_self and the network
teacher hook, against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selfkd_jax import methods
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
                lambda **kw: methods.aekt(_teacher, 4, **kw)):
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
  aekt = methods.aekt(_teacher, 4, warmup_epochs=0, weight_fn="constant",
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
  method = methods.aekt(_teacher, 4, warmup_epochs=0, max_weight=1.16, serialization_head=False)
  loss, _, metrics = _run(method)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["aekt_weight"], weight.mean(), rtol=1e-5)


def test_aekt_head_gets_the_distillation_and_ce_stays_on_the_classifier():
  method = methods.aekt(_teacher, 4, warmup_epochs=0, weight_fn="constant",
                        head_optimizer=optax.sgd(0.1))
  state = method.init(None)
  np.testing.assert_array_equal(state.head_params["kernel"], np.eye(4))  # starts as a no-op
  # A head of 2·I: CE sees z, the distillation terms see 2z.
  doubled = state._replace(head_params={"kernel": 2 * jnp.eye(4), "bias": jnp.zeros(4)})
  tckd, nckd = _tckd_nckd(2 * STUDENT, TEACHER, LABELS, 4.0)
  loss, new_state, _ = _run(method, doubled)
  np.testing.assert_allclose(loss, _ce(STUDENT, LABELS) + tckd + 8 * nckd, rtol=1e-5)
  # The method trains the head: its SGD step lowers the distillation loss of the same batch.
  distill_before = float(jnp.mean(loss)) - _ce(STUDENT, LABELS).mean()
  distill_after = float(jnp.mean(_run(method, new_state)[0])) - _ce(STUDENT, LABELS).mean()
  assert distill_after < distill_before
  # The backbone gradient flows through the head: d loss / d z includes the head's 2x.
  grad = jax.grad(lambda z: jnp.sum(method.update(
      doubled, {"logits": z}, {"label": LABELS}, step=0)[0]))(jnp.asarray(STUDENT))
  expected_grad = jax.grad(lambda z: jnp.sum(
      methods.dkd(_teacher, warmup_epochs=0).update(
          (), {"logits": 2 * z}, {"label": LABELS}, step=0)[0]
      - optax.softmax_cross_entropy_with_integer_labels(2 * z, LABELS)
      + optax.softmax_cross_entropy_with_integer_labels(z, LABELS)))(jnp.asarray(STUDENT))
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


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
    (lambda: methods.aekt(_teacher, 4, steps_per_epoch=1, weight_fn="square"), "weight_fn"),
    (lambda: methods.aekt(_teacher, 4, steps_per_epoch=1, max_weight=0.0), "max_weight"),
    (lambda: methods.tfkd_self(_teacher, variant="x"), "variant"),
])
def test_bad_arguments_are_one_line_errors(build, message):
  with pytest.raises(ValueError, match=message):
    build()
