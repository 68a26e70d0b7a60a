"""Tests for Zipf's label smoothing: the target primitives, the bilinear upsampling of the
dense logits, the `zipf` method and the models' 'dense_logits' output.

Expectations are hand-computed or come from float64 numpy references written from the
definitions (docs/METHODS.md) and from the official code's conventions (scipy
`rankdata(..., method='min')`, PyTorch bilinear interpolation with align_corners=False).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import losses
from selfkd_jax import models
from selfkd_jax.methods.zipf import upsample_dense_logits, zipf
from numpy_reference import log_softmax, softmax

STEP = jnp.int32(0)

# ----------------------------------------------------------------------- numpy references


def ref_min_ranks(scores):
  """scipy's rankdata(-scores, method='min') on the last axis."""
  scores = np.asarray(scores, np.float64)
  return 1 + np.sum(scores[..., None, :] > scores[..., :, None], axis=-1)


def ref_zipf_rows(scores, labels):
  weights = 1.0 / ref_min_ranks(scores)
  np.put_along_axis(weights, np.asarray(labels)[..., None], 0.0, axis=-1)
  return weights / weights.sum(-1, keepdims=True)


def ref_votes(dense, num_classes):
  """`[..., P, C]` logits -> `[..., C]` argmax vote counts."""
  winners = np.argmax(dense, axis=-1)
  return np.sum(winners[..., None] == np.arange(num_classes), axis=-2)


def ref_bilinear_matrix(size, factor):
  """`[factor·size, size]` weights of PyTorch's bilinear, align_corners=False.

  Output pixel i samples the input at (i + 0.5) / factor - 0.5, clamped below at 0
  (PyTorch's `area_pixel_compute_source_index`); the right neighbour is clamped at the
  last pixel.
  """
  weights = np.zeros((factor * size, size))
  for i in range(factor * size):
    source = max((i + 0.5) / factor - 0.5, 0.0)
    left = int(math.floor(source))
    right = min(left + 1, size - 1)
    frac = source - left
    weights[i, left] += 1.0 - frac
    weights[i, right] += frac
  return weights


def ref_upsample(x, factor):
  """`[B, h, w, C]` -> `[B, factor·h, factor·w, C]`."""
  x = np.asarray(x, np.float64)
  rows = ref_bilinear_matrix(x.shape[1], factor)
  cols = ref_bilinear_matrix(x.shape[2], factor)
  return np.einsum('ih,jw,bhwc->bijc', rows, cols, x)


def ref_kl_non_target(logits, targets, label):
  """KL(targets ‖ softmax over the non-target logits) for one example."""
  others = [k for k in range(len(logits)) if k != label]
  p = np.asarray(targets, np.float64)[others]
  log_q = log_softmax(np.asarray(logits)[others])
  positive = p > 0
  return float(np.sum(p[positive] * (np.log(p[positive]) - log_q[positive])))


def ref_method(logits, labels, weight, *, dense_logits=None, upsample=1):
  """Per-example `CE + weight·KL`, the KL values and the targets, in float64."""
  logits = np.asarray(logits, np.float64)
  num_classes = logits.shape[-1]
  if dense_logits is None:
    targets = ref_zipf_rows(logits, labels)
  else:
    up = ref_upsample(dense_logits, upsample)
    votes = ref_votes(up.reshape(up.shape[0], -1, num_classes), num_classes)
    targets = ref_zipf_rows(votes, labels)
  ce = -log_softmax(logits)[np.arange(len(labels)), labels]
  kl = np.array([ref_kl_non_target(z, t, y) for z, t, y in zip(logits, targets, labels)])
  return ce + weight * kl, kl, targets


def run_update(method, outputs, labels):
  return jax.jit(lambda o, y: method.update(
      method.init(), o, {'label': y}, step=STEP))(outputs, labels)


def dense_logits_with_votes(votes, num_classes, height, width, seed=0):
  """`[h, w, C]` logits whose per-position argmax gives exactly `votes`."""
  rng = np.random.default_rng(seed)
  winners = [k for k, count in enumerate(votes) for _ in range(count)]
  assert len(winners) == height * width
  dense = rng.uniform(-1.0, 0.0, size=(height * width, num_classes))
  dense[np.arange(len(winners)), rng.permutation(winners)] = 4.0
  return dense.reshape(height, width, num_classes).astype(np.float32)


def test_reference_bilinear_is_half_pixel_not_align_corners():
  # [0, 4] ×2: samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
  # align_corners=True would give [0, 4/3, 8/3, 4] instead.
  np.testing.assert_allclose(ref_bilinear_matrix(2, 2) @ [0.0, 4.0], [0.0, 1.0, 3.0, 4.0])


# ------------------------------------------------------------------- target primitives


def test_zipf_logit_targets_hand_values_with_ties():
  logits = np.array([[2.0, 5.0, 2.0, -1.0, 5.0]] * 2, np.float32)
  # Ranks over all 5 classes, ties at the minimum: [3, 1, 3, 5, 1].
  # Label 0 (rank 3): weights [-, 1, 1/3, 1/5, 1], sum 38/15.
  # Label 1 (rank 1, the top): weights [1/3, -, 1/3, 1/5, 1], sum 28/15; the label's own
  # rank still counts, so class 4 keeps rank 1 only because it ties with the label.
  out = jax.jit(losses.zipf_logit_targets)(logits, np.array([0, 1], np.int32))
  assert out.shape == (2, 5) and out.dtype == jnp.float32
  np.testing.assert_allclose(out[0], [0, 15 / 38, 5 / 38, 3 / 38, 15 / 38], rtol=1e-6)
  np.testing.assert_allclose(out[1], [5 / 28, 0, 5 / 28, 3 / 28, 15 / 28], rtol=1e-6)


def test_zipf_logit_targets_label_takes_part_in_the_ranking():
  # Label 2 has the largest logit: the others get ranks 2, 3, 4 (not 1, 2, 3).
  out = losses.zipf_logit_targets(np.array([3.0, 2.0, 9.0, 1.0]), np.array(2))
  weights = np.array([1 / 2, 1 / 3, 0.0, 1 / 4])
  np.testing.assert_allclose(out, weights / weights.sum(), rtol=1e-6)


def test_zipf_logit_targets_match_reference_with_ties():
  rng = np.random.default_rng(1)
  logits = rng.integers(-2, 3, size=(2, 3, 7)).astype(np.float32)  # many ties
  labels = rng.integers(0, 7, size=(2, 3)).astype(np.int32)
  out = jax.jit(losses.zipf_logit_targets)(logits, labels)
  np.testing.assert_allclose(out, ref_zipf_rows(logits, labels), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(out), labels[..., None], -1), 0)
  np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, rtol=1e-6)


def test_zipf_logit_targets_rejects_mismatched_labels():
  with pytest.raises(ValueError, match=r'must be \[\.\.\., C\]'):
    losses.zipf_logit_targets(np.zeros((2, 5)), np.zeros((3,), np.int32))


def test_zipf_logit_targets_bf16_rank_the_rounded_logits():
  logits = np.random.default_rng(2).normal(size=(4, 9)).astype(np.float32)
  labels = np.array([0, 3, 8, 5], np.int32)
  out = losses.zipf_logit_targets(jnp.asarray(logits, jnp.bfloat16), labels)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)
  np.testing.assert_allclose(out, ref_zipf_rows(rounded, labels), rtol=1e-6)


def test_zipf_targets_known_vote_ranking():
  # Votes [0, 4, 2, 2, 1] over 9 positions -> ranks [5, 1, 2, 2, 4]; label 2 dropped:
  # weights [1/5, 1, -, 1/2, 1/4], sum 39/20.
  dense = dense_logits_with_votes([0, 4, 2, 2, 1], 5, 3, 3)
  out = losses.zipf_targets(dense.reshape(1, 9, 5), np.array([2], np.int32))
  np.testing.assert_allclose(out[0], [4 / 39, 20 / 39, 0, 10 / 39, 5 / 39], rtol=1e-6)


# ----------------------------------------------------------------------- upsampling


def test_upsample_hand_values():
  x = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)[None, :, :, None]
  # Rows: [0, 4] -> [0, 1, 3, 4]; [8, 12] -> [8, 9, 11, 12]; then the same down the columns.
  expected = np.array([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], np.float32)
  np.testing.assert_allclose(upsample_dense_logits(x, 2)[0, :, :, 0], expected, atol=1e-6)
  np.testing.assert_array_equal(upsample_dense_logits(x, 1), x)


@pytest.mark.parametrize('factor', [2, 3])
def test_upsampling_commutes_with_the_classifier(factor):
  # The official code upsamples the feature map, then applies the classifier; we upsample
  # the dense logits. Equal because bilinear weights are convex and the classifier affine.
  rng = np.random.default_rng(3)
  feature_map = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  kernel, bias = rng.normal(size=(6, 5)), rng.normal(size=(5,))
  official = ref_upsample(feature_map, factor) @ kernel + bias
  dense_logits = (feature_map @ kernel + bias).astype(np.float32)
  ours = jax.jit(upsample_dense_logits, static_argnums=1)(dense_logits, factor)
  assert ours.shape == (2, 3 * factor, 4 * factor, 5) and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, official, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize('dense,upsample,weight', [
    (True, 2, 0.1), (True, 1, 0.1), (True, 3, 1.0), (False, 2, 0.3)])
def test_method_loss_is_ce_plus_weighted_kl(dense, upsample, weight):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(3, 6)).astype(np.float32)
  dense_logits = rng.normal(size=(3, 2, 3, 6)).astype(np.float32)
  labels = np.array([0, 5, 2], np.int32)
  method = zipf(weight=weight, dense=dense, upsample=upsample)
  loss, state, metrics = run_update(
      method, {'logits': logits, 'dense_logits': dense_logits}, labels)
  expected, kl, _ = ref_method(logits, labels, weight,
                               dense_logits=dense_logits if dense else None,
                               upsample=upsample)
  assert loss.shape == (3,) and loss.dtype == jnp.float32 and state == method.init()
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['zipf_loss'], kl.mean(), rtol=1e-5)
  assert set(metrics) == {'zipf_loss'}


def test_method_votes_with_a_known_ranking():
  # No upsampling: the 9 positions vote [0, 4, 2, 2, 1]; label 2 -> the hand targets above.
  dense = dense_logits_with_votes([0, 4, 2, 2, 1], 5, 3, 3)[None]
  logits = np.array([[0.5, -1.0, 2.0, 0.0, 1.0]], np.float32)
  loss, _, metrics = run_update(zipf(weight=0.5, upsample=1),
                                {'logits': logits, 'dense_logits': dense}, np.array([2]))
  targets = np.array([4 / 39, 20 / 39, 0, 10 / 39, 5 / 39])
  kl = ref_kl_non_target(logits[0], targets, 2)
  ce = -log_softmax(logits[0])[2]
  np.testing.assert_allclose(loss, [ce + 0.5 * kl], rtol=1e-6)
  np.testing.assert_allclose(metrics['zipf_loss'], kl, rtol=1e-6)


@pytest.mark.parametrize('dense', [True, False])
def test_method_targets_carry_no_gradient(dense):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 6)).astype(np.float32)
  dense_logits = rng.normal(size=(3, 2, 2, 6)).astype(np.float32)
  labels = np.array([1, 0, 4], np.int32)
  weight = 0.7
  method = zipf(weight=weight, dense=dense)

  def mean_loss(z, d):
    loss, _, _ = method.update(method.init(), {'logits': z, 'dense_logits': d},
                               {'label': labels}, step=STEP)
    return jnp.mean(loss)

  grad_z, grad_d = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))(logits, dense_logits)
  # With P constant: d(CE)/dz = softmax(z) − onehot; d(KL)/dz = q̂ − P off the label, 0 on it.
  _, _, targets = ref_method(logits, labels, weight,
                             dense_logits=dense_logits if dense else None, upsample=2)
  expected = np.exp(log_softmax(logits))
  expected[np.arange(3), labels] -= 1.0
  for i, y in enumerate(labels):
    others = [k for k in range(6) if k != y]
    expected[i, others] += weight * (np.exp(log_softmax(logits[i, others]))
                                     - targets[i, others])
  np.testing.assert_allclose(grad_z, expected / 3, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad_d, 0.0)


def test_method_bf16_inputs_finite_and_close():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(4, 10)).astype(np.float32)
  dense_logits = rng.normal(size=(4, 2, 2, 10)).astype(np.float32)
  labels = np.array([0, 9, 3, 3], np.int32)
  method = zipf()
  bf16 = {k: jnp.asarray(v, jnp.bfloat16)
          for k, v in {'logits': logits, 'dense_logits': dense_logits}.items()}
  loss, _, metrics = run_update(method, bf16, labels)
  assert loss.dtype == jnp.float32 and np.all(np.isfinite(loss))
  assert np.isfinite(metrics['zipf_loss'])
  # Exact on the rounded inputs, and close to the float32 loss.
  rounded = {k: np.asarray(v, np.float32) for k, v in bf16.items()}
  expected, _, _ = ref_method(rounded['logits'], labels, 0.1,
                              dense_logits=rounded['dense_logits'], upsample=2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  fp32, _, _ = run_update(method, {'logits': logits, 'dense_logits': dense_logits}, labels)
  np.testing.assert_allclose(loss, fp32, rtol=2e-2)


def test_missing_dense_logits_raises():
  outputs = {'logits': np.zeros((2, 5), np.float32)}
  labels = np.array([0, 1], np.int32)
  with pytest.raises(ValueError, match=r"no 'dense_logits'.*use zipf\(dense=False\)"):
    run_update(zipf(), outputs, labels)
  loss, _, _ = run_update(zipf(dense=False), outputs, labels)
  np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)  # uniform logits: KL = 0


@pytest.mark.parametrize('kwargs,match', [
    ({'weight': -0.1}, 'weight'), ({'upsample': 0}, 'upsample'),
    ({'upsample': 1.5}, 'upsample'), ({'upsample': True}, 'upsample')])
def test_method_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    zipf(**kwargs)


def test_method_does_not_retrace_across_steps():
  traces = []
  method = zipf()

  @jax.jit
  def step_fn(outputs, labels, step):
    traces.append(None)
    return method.update(method.init(), outputs, {'label': labels}, step=step)[0]

  rng = np.random.default_rng(7)
  outputs = {'logits': rng.normal(size=(2, 4)).astype(np.float32),
             'dense_logits': rng.normal(size=(2, 2, 2, 4)).astype(np.float32)}
  labels = np.array([1, 2], np.int32)
  for step in range(3):
    step_fn(outputs, labels, jnp.int32(step))
  assert len(traces) == 1


# ---------------------------------------------------------------------------- the models

MNIST_SHAPE, CIFAR_SHAPE = (2, 28, 28, 1), (2, 32, 32, 3)
# name -> (input shape, expected dense_logits shape with 10 classes, or None).
DENSE_SHAPES = {
    'resnet18': (CIFAR_SHAPE, (2, 4, 4, 10)),
    'preact_resnet18': (CIFAR_SHAPE, (2, 4, 4, 10)),
    'wrn16_2': (CIFAR_SHAPE, (2, 8, 8, 10)),
    'mlp': (MNIST_SHAPE, (2, 1, 1, 10)),
    'lenet5_bn': (MNIST_SHAPE, None),
}


def _abstract_variables(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize('name', sorted(DENSE_SHAPES))
def test_dense_logits_present_exactly_when_the_map_feeds_the_classifier(name):
  shape, dense_shape = DENSE_SHAPES[name]
  model = models.get_model(name, num_classes=10)
  variables = _abstract_variables(model, shape)
  outputs = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  if dense_shape is None:
    assert 'dense_logits' not in outputs
    with pytest.raises(ValueError, match="no 'dense_logits'"):
      jax.eval_shape(lambda o: zipf().update(zipf().init(), o, {'label': jnp.zeros(2, jnp.int32)},
                                             step=STEP), outputs)
  else:
    assert outputs['dense_logits'].shape == dense_shape
    assert outputs['dense_logits'].dtype == jnp.float32
  # One classifier, shared: calling it twice adds no parameters.
  classifier = variables['params']['classifier']
  assert set(classifier) == {'kernel', 'bias'}
  assert not [key for key in variables['params'] if key.startswith('Dense')]


def _random_variables(model, shape, seed=0):
  """Numpy-filled variables with `model.init`'s shapes (compiling init is slow on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / math.prod(leaf.shape[:-1]))
    elif name in ('scale', 'var'):
      value = 1.0 + 0.1 * np.abs(rng.normal(size=leaf.shape))
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, shape))


@pytest.mark.parametrize('name', ['mlp', 'wrn16_2'])
def test_dense_logits_are_the_classifier_at_every_position(name):
  shape, _ = DENSE_SHAPES[name]
  model = models.get_model(name, num_classes=10)
  variables = _random_variables(model, shape)
  images = jax.random.normal(jax.random.key(1), shape)
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  kernel = np.asarray(variables['params']['classifier']['kernel'], np.float64)
  bias = np.asarray(variables['params']['classifier']['bias'], np.float64)
  dense_logits = np.asarray(outputs['dense_logits'], np.float64)
  assert np.std(dense_logits) > 1e-3
  feature_map = np.asarray(outputs['feature_map'], np.float64)
  np.testing.assert_allclose(dense_logits, feature_map @ kernel + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense_logits.mean(axis=(1, 2)), outputs['logits'],
                             rtol=1e-5, atol=1e-5)
  # The method end to end on real model outputs.
  labels = np.array([3, 7], np.int32)
  loss, _, _ = run_update(zipf(), outputs, labels)
  expected, _, _ = ref_method(outputs['logits'], labels, 0.1,
                              dense_logits=outputs['dense_logits'], upsample=2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)


def test_zipf_logit_targets_is_exported():
  assert 'zipf_logit_targets' in losses.__all__
