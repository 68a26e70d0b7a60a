"""KD against numpy, with ReffAKD's soft labels as a label-only pseudo-teacher."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import methods
from numpy_reference import log_softmax

SOFT = np.array([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.1, 0.3, 0.6]], np.float32)
LOGITS = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.1], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0]],
                  np.float32)
LABELS = np.array([0, 1, 2, 2], np.int32)


def _method(**kwargs):
  teacher = methods.label_teacher(methods.soft_label_teacher(SOFT, as_logits=True))
  return methods.kd(teacher, **kwargs)


@pytest.mark.parametrize("alpha,temperature", [(0.9, 4.0), (0.3, 1.0)])
def test_kd_with_soft_label_teacher_matches_numpy(alpha, temperature):
  # In float32, as the method computes it (float64 differs by 1.7e-5 relative at T 4).
  lsm = functools.partial(log_softmax, dtype=np.float32)
  teacher = np.exp(lsm(np.log(SOFT[LABELS]) / temperature))  # the tempered row
  kl = np.sum(teacher * (np.log(teacher) - lsm(LOGITS / temperature)), -1)
  ce = -lsm(LOGITS)[np.arange(4), LABELS]
  expected = (1 - alpha) * ce + alpha * temperature**2 * kl
  method = _method(alpha=alpha, temperature=temperature)
  got, _, metrics = jax.jit(lambda z: method.update((), {"logits": z}, {"label": LABELS},
                                                    step=0))(jnp.asarray(LOGITS))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["kd_distill"], (temperature**2 * kl).mean(), rtol=1e-5)


def test_kd_teacher_gets_no_gradient():
  # A teacher computed from the student's own logits must not pass gradient back.
  method = methods.kd(lambda outputs, batch, hooks: outputs["logits"] * 2.0, alpha=1.0)
  grad = jax.grad(lambda z: method.update((), {"logits": z}, {"label": LABELS}, step=0
                                          )[0].sum())(jnp.asarray(LOGITS))
  probs = np.exp(log_softmax(LOGITS / 4.0))
  teacher = np.exp(log_softmax(2.0 * LOGITS / 4.0))
  np.testing.assert_allclose(grad, 4.0 * (probs - teacher), rtol=1e-5, atol=1e-6)


def test_kd_bad_arguments():
  with pytest.raises(ValueError, match="alpha must be in"):
    _method(alpha=2.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    _method(temperature=0.0)
