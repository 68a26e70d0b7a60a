"""Tf-KD_reg and LsrKD(+TC) against numpy written from docs/METHODS.md; the target_kl primitive."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import losses
from selfkd_jax.methods import virtual_teacher

LOGITS = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 4.0, 0.0, 1.0]],
                  np.float32)
from numpy_reference import log_softmax, softmax
LABELS = np.array([0, 2, 3], np.int32)


def _kl(p, log_q):
  return np.sum(p * (np.log(p) - log_q), -1)


def _ce(z, y):
  return -log_softmax(z)[np.arange(len(y)), y]


def _designed(y, c, a):
  rows = np.full((len(y), c), (1 - a) / (c - 1))
  rows[np.arange(len(y)), y] = a
  return rows


def _run(method, logits=LOGITS, labels=LABELS):
  update = jax.jit(lambda o, b: method.update(method.init(), o, b, step=0)[0])
  return np.asarray(update({"logits": jnp.asarray(logits)}, {"label": jnp.asarray(labels)}))


def test_target_kl_matches_numpy_and_stops_target_gradient():
  targets = softmax(np.array([[0.3, 0.1, -0.2, 0.0]] * 3, np.float64))
  got = losses.target_kl(LOGITS, targets, temperature=2.0)
  np.testing.assert_allclose(got, _kl(targets, log_softmax(LOGITS / 2.0)), rtol=1e-5)
  # A zero target entry contributes 0, not NaN.
  one_hot = np.eye(4)[LABELS]
  np.testing.assert_allclose(losses.target_kl(LOGITS, one_hot), _ce(LOGITS, LABELS), rtol=1e-5)
  grad = jax.grad(lambda t: losses.target_kl(LOGITS, t).sum())(jnp.asarray(targets))
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("alpha,temperature,multiplier", [(0.1, 20.0, 100.0), (0.6, 3.0, 7.0)])
def test_tfkd_reg_faithful(alpha, temperature, multiplier):
  teacher = softmax(_designed(LABELS, 4, 0.99) / temperature)  # probabilities as logits
  kl = _kl(teacher, log_softmax(LOGITS))  # the student is not tempered
  expected = (1 - alpha) * _ce(LOGITS, LABELS) + alpha * (multiplier / 4) * kl
  got = _run(virtual_teacher.tfkd_reg(alpha=alpha, temperature=temperature,
                                      multiplier=multiplier))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tfkd_reg_paper():
  teacher = softmax(_designed(LABELS, 4, 0.9) / 5.0)
  kl = _kl(teacher, log_softmax(LOGITS / 5.0))
  expected = 0.3 * _ce(LOGITS, LABELS) + 0.7 * kl
  got = _run(virtual_teacher.tfkd_reg(alpha=0.7, temperature=5.0, correct_prob=0.9,
                                      variant="paper"))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lsrkd_uniform_teacher():
  uniform = np.full((3, 4), 0.25)
  expected = 0.8 * _ce(LOGITS, LABELS) + 0.2 * 9.0 * _kl(uniform, log_softmax(LOGITS / 3.0))
  np.testing.assert_allclose(_run(virtual_teacher.lsrkd(alpha=0.2, temperature=3.0)), expected,
                             rtol=1e-5)


def test_lsrkd_at_t1_has_the_gradient_of_label_smoothing():
  # KL(u || p) = soft_ce(z, u) - H(u): LsrKD at T=1 is LS with epsilon=alpha up to a constant.
  def grad_of(loss_fn):
    return jax.grad(lambda z: loss_fn(z).sum())(jnp.asarray(LOGITS))
  lsrkd = virtual_teacher.lsrkd(alpha=0.3, temperature=1.0)
  smoothing = losses.smooth_labels(LABELS, 4, 0.3)
  np.testing.assert_allclose(
      grad_of(lambda z: lsrkd.update((), {"logits": z}, {"label": LABELS}, step=0)[0]),
      grad_of(lambda z: losses.soft_cross_entropy(z, smoothing)), rtol=1e-5, atol=1e-7)


def test_lsrkd_teacher_correction():
  teacher = _designed(LABELS, 4, 0.5)
  expected = 0.9 * _ce(LOGITS, LABELS) + 0.1 * 4.0 * _kl(teacher, log_softmax(LOGITS / 2.0))
  got = _run(virtual_teacher.lsrkd(alpha=0.1, temperature=2.0, beta=0.5))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # beta = 1/C is the uniform teacher, i.e. plain LsrKD.
  np.testing.assert_allclose(_run(virtual_teacher.lsrkd(beta=0.25)),
                             _run(virtual_teacher.lsrkd()), rtol=1e-6)


def test_bfloat16_logits_are_close_to_float32():
  for method in (virtual_teacher.tfkd_reg(), virtual_teacher.lsrkd(beta=0.5)):
    low = _run(method, logits=LOGITS.astype(jnp.bfloat16))
    assert low.dtype == np.float32 and np.all(np.isfinite(low))
    np.testing.assert_allclose(low, _run(method), rtol=2e-2)


@pytest.mark.parametrize("build,match", [
    (lambda: virtual_teacher.tfkd_reg(alpha=1.5), "alpha must be in"),
    (lambda: virtual_teacher.tfkd_reg(temperature=0.0), "temperature must be > 0"),
    (lambda: virtual_teacher.tfkd_reg(variant="code"), "allowed: faithful, paper"),
    (lambda: virtual_teacher.lsrkd(beta=-0.1), "beta must be in"),
])
def test_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()
