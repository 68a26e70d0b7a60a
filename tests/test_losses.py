"""Tests of `selfkd_jax.losses` against independent float64 numpy references.

The references below loop over examples, classes and pairs on purpose: they share no code
(and no vectorisation trick) with the library. Tolerances: float32 results against the
float64 references use `rtol=1e-5, atol=1e-6` (atol scaled by `τ²` where a temperature
multiplies the result).

Compilation dominates the run time on CPU, so every call goes through a module-level
`jax.jit` (eager op-by-op dispatch is several times slower), hyper-parameters are traced
arguments, and inputs share a few shapes so that compiled programs are reused across tests.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import losses
from selfkd_jax.losses import _common
from selfkd_jax.losses import zipf as zipf_module

RTOL = 1e-5
ATOL = 1e-6
BATCH = (2, 3)  # Every reference test uses a leading batch shape [2, 3, C].
C = 6


# ----------------------------------------------------------------------------- references


def ref_softmax(v):
  v = np.asarray(v, np.float64)
  e = np.exp(v - v.max())
  return e / e.sum()


def ref_kl(p, q):
  total = 0.0
  for p_k, q_k in zip(p, q):
    if p_k > 0:
      total += p_k * (np.log(p_k) - np.log(q_k))
  return total


def ref_cross_entropy(z, y):
  return -np.log(ref_softmax(z)[y])


def ref_soft_cross_entropy(z, t):
  log_p = np.log(ref_softmax(z))
  return -sum(t[k] * log_p[k] for k in range(len(z)))


def ref_distillation_kl(s, t, tau):
  return tau**2 * ref_kl(ref_softmax(np.asarray(t) / tau), ref_softmax(np.asarray(s) / tau))


def ref_dkd(s, t, y, alpha, beta, temperature):
  s = np.asarray(s, np.float64) / temperature
  t = np.asarray(t, np.float64) / temperature
  p_s, p_t = ref_softmax(s), ref_softmax(t)
  b_s = [p_s[y], 1.0 - p_s[y]]
  b_t = [p_t[y], 1.0 - p_t[y]]
  others = [k for k in range(len(s)) if k != y]
  tckd = ref_kl(b_t, b_s)
  nckd = ref_kl(ref_softmax(t[others]), ref_softmax(s[others]))
  return temperature**2 * (alpha * tckd + beta * nckd)


def ref_vote_ranks(votes):
  return [1 + sum(1 for v_j in votes if v_j > v_k) for v_k in votes]


def ref_zipf_targets(dense, y):
  num_positions, num_classes = dense.shape
  votes = [0] * num_classes
  for position in range(num_positions):
    votes[int(np.argmax(dense[position]))] += 1
  ranks = ref_vote_ranks(votes)
  weights = [0.0 if k == y else 1.0 / ranks[k] for k in range(num_classes)]
  total = sum(weights)
  return np.array([w / total for w in weights])


def ref_zipf_loss(z, t, y):
  others = [k for k in range(len(z)) if k != y]
  return ref_kl(np.asarray(t, np.float64)[others], ref_softmax(np.asarray(z)[others]))


def ref_cosine(a, b):
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 or nb == 0:
    return 0.0
  return float(a @ b / (na * nb))


def ref_relation_matrix(prototypes, tau):
  num_classes = len(prototypes)
  out = np.zeros((num_classes, num_classes))
  for c in range(num_classes):
    others = [j for j in range(num_classes) if j != c]
    logits = [ref_cosine(prototypes[c], prototypes[j]) / tau for j in others]
    for j, p in zip(others, ref_softmax(logits)):
      out[c, j] = p
  return out


def ref_class_similarity(embeddings, labels, num_classes, diag_boost):
  sums = np.zeros((num_classes, num_classes))
  counts = np.zeros((num_classes, num_classes))
  for i, j in itertools.combinations(range(len(labels)), 2):
    a, b = labels[i], labels[j]
    if not (0 <= a < num_classes and 0 <= b < num_classes):
      continue
    cos = ref_cosine(embeddings[i], embeddings[j])
    if a == b:
      sums[a, a] += cos
      counts[a, a] += 1
    else:
      sums[a, b] += cos
      sums[b, a] += cos
      counts[a, b] += 1
      counts[b, a] += 1
  out = np.zeros((num_classes, num_classes))
  for a in range(num_classes):
    for b in range(num_classes):
      if counts[a, b] > 0:
        out[a, b] = sums[a, b] / counts[a, b]
  return out + diag_boost * np.eye(num_classes)


def per_example(ref, *arrays, batch_shape):
  """Applies a single-example reference at every index of `batch_shape`."""
  out = np.zeros(batch_shape)
  for index in np.ndindex(*batch_shape):
    out[index] = ref(*[a[index] for a in arrays])
  return out


def rows(ref, *arrays, batch_shape, num_classes):
  out = np.zeros(tuple(batch_shape) + (num_classes,))
  for index in np.ndindex(*batch_shape):
    out[index] = ref(*[a[index] for a in arrays])
  return out


def random_logits(seed, shape, scale=2.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def random_labels(seed, shape, num_classes):
  return np.random.default_rng(seed).integers(0, num_classes, size=shape).astype(np.int32)


def random_probs(seed, shape):
  return np.stack([ref_softmax(v) for v in random_logits(seed, shape).reshape(-1, shape[-1])]
                 ).reshape(shape).astype(np.float32)


def bf16_round(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def sum_loss(fn):
  """`fn` summed to a scalar, for `jax.grad`."""
  return lambda *args: jnp.sum(fn(*args))


# Shared inputs: leading batch [2, 3], C = 6 classes.
Z_S = random_logits(0, BATCH + (C,))
Z_T = random_logits(1, BATCH + (C,), scale=3.0)
Y = random_labels(2, BATCH, C)
PROBS = random_probs(3, BATCH + (C,))
# Non-target distributions: zero on the label column, one more zero elsewhere in row [0, 0].
NON_TARGET = random_probs(4, BATCH + (C,))
np.put_along_axis(NON_TARGET, Y[..., None], 0.0, axis=-1)
NON_TARGET[0, 0, (Y[0, 0] + 1) % C] = 0.0
NON_TARGET /= NON_TARGET.sum(-1, keepdims=True)
DENSE = np.random.default_rng(5).integers(0, 50, size=BATCH + (9, C)).astype(np.float32)
PROTOTYPES = random_logits(6, (C, 3))
PROTOTYPES[2] *= 10.0  # Cosine must not depend on the norm.
IDX = tuple(np.indices(BATCH))  # Fancy index of the label column: x[IDX + (Y,)].

# Module-level jitted functions: one compilation per input shape/dtype, shared by tests.
cross_entropy = jax.jit(losses.cross_entropy)
soft_cross_entropy = jax.jit(losses.soft_cross_entropy)
distillation_kl = jax.jit(losses.distillation_kl)
cskd_loss = jax.jit(losses.cskd_loss)
smooth_labels = jax.jit(losses.smooth_labels, static_argnums=1,
                        static_argnames='exclude_target')
corrected_uniform = jax.jit(losses.corrected_uniform, static_argnums=1)
pskd_alpha = jax.jit(losses.pskd_alpha)
pskd_targets = jax.jit(losses.pskd_targets)
zipf_targets = jax.jit(losses.zipf_targets)
zipf_loss = jax.jit(losses.zipf_loss)
dkd_loss = jax.jit(losses.dkd_loss)
relation_matrix = jax.jit(losses.relation_matrix)
class_similarity = jax.jit(losses.class_similarity, static_argnums=2)
reffakd_soft_labels = jax.jit(losses.reffakd_soft_labels)


# --------------------------------------------------------------------- classification


def test_cross_entropy_matches_reference():
  out = cross_entropy(Z_S, Y)
  assert out.shape == BATCH and out.dtype == jnp.float32
  expected = per_example(ref_cross_entropy, Z_S, Y, batch_shape=BATCH)
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
  # Uniform logits: -log(1/C) whatever the label.
  np.testing.assert_allclose(cross_entropy(np.zeros_like(Z_S), Y), np.full(BATCH, np.log(C)),
                             rtol=1e-6)


def test_cross_entropy_rejects_float_labels():
  with pytest.raises(TypeError):
    losses.cross_entropy(Z_S, Y.astype(np.float32))


def test_a_label_column_and_integer_targets_are_refused():
  logits = np.zeros((C, C), np.float32)  # B == C: [B] ids would broadcast along the classes
  with pytest.raises(ValueError, match=r'labels \(4, 1\) must have the shape of logits'):
    losses.cross_entropy(logits[:4], np.zeros((4, 1), np.int32))
  with pytest.raises(TypeError, match='for integer class ids use cross_entropy'):
    losses.soft_cross_entropy(logits, np.arange(C))
  with pytest.raises(ValueError, match=r'targets \(4, 1, 6\) must be probability rows'):
    losses.soft_cross_entropy(logits[:4], np.full((4, 1, C), 1 / C, np.float32))
  uniform = np.full((C,), 1 / C, np.float32)  # one row for every example: still allowed
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, uniform), np.log(C), rtol=1e-6)


def test_out_of_range_labels_give_nan_not_another_class():
  """Inside a jitted step a wrong label cannot raise; it must not train silently either (a
  gather wraps -1 around to class C-1, a one-hot of C is a zero row): NaN in every loss and
  target row that takes labels, finite values for the valid ones."""
  labels = np.array([0, -1, C, C - 1], np.int32)
  bad = np.array([False, True, True, False])
  z_s, z_t = Z_S.reshape(-1, C)[:4], Z_T.reshape(-1, C)[:4]
  past = np.full((4, C), 1 / C, np.float32)
  per_example_values = {
      'cross_entropy': cross_entropy(z_s, labels),
      'dkd_loss': dkd_loss(z_s, z_t, labels),
      'zipf_loss': zipf_loss(z_s, past, labels),
      'smooth_labels': jnp.sum(smooth_labels(labels, C, 0.1), -1),
      'smooth_labels(exclude_target)': jnp.sum(smooth_labels(labels, C, 0.1,
                                                             exclude_target=True), -1),
      'corrected_uniform': jnp.sum(corrected_uniform(labels, C, 0.5), -1),
      'pskd_targets': jnp.sum(pskd_targets(labels, past, 0.5), -1),
  }
  for name, values in per_example_values.items():
    np.testing.assert_array_equal(np.isnan(values), bad, err_msg=name)


def test_soft_cross_entropy_matches_reference_and_gradient_reaches_targets():
  expected = per_example(ref_soft_cross_entropy, Z_S, PROBS, batch_shape=BATCH)
  np.testing.assert_allclose(soft_cross_entropy(Z_S, PROBS), expected, rtol=RTOL, atol=ATOL)
  # Not stop-gradient: d/dt_k of -Σ t log p = -log p_k.
  grad_t = jax.jit(jax.grad(sum_loss(losses.soft_cross_entropy), argnums=1))(Z_S, PROBS)
  expected_grad = rows(lambda z: -np.log(ref_softmax(z)), Z_S, batch_shape=BATCH,
                       num_classes=C)
  np.testing.assert_allclose(grad_t, expected_grad, rtol=1e-5)


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_distillation_kl_matches_reference(tau):
  expected = per_example(lambda s, t: ref_distillation_kl(s, t, tau), Z_S, Z_T,
                         batch_shape=BATCH)
  # The temperature is a traced argument: both values share one compilation.
  np.testing.assert_allclose(distillation_kl(Z_S, Z_T, jnp.float32(tau)), expected,
                             rtol=RTOL, atol=ATOL * tau**2)


def test_distillation_kl_zero_iff_identical():
  np.testing.assert_allclose(distillation_kl(Z_S, Z_S, jnp.float32(2.0)), np.zeros(BATCH),
                             atol=1e-6)
  assert np.all(np.asarray(distillation_kl(Z_S, np.roll(Z_S, 1, axis=-1), 2.0)) > 1e-3)


def test_distillation_kl_gradients():
  tau = 3.0
  grad_s, grad_t = jax.jit(jax.grad(sum_loss(losses.distillation_kl), argnums=(0, 1)))(
      Z_S, Z_T, tau)
  np.testing.assert_array_equal(grad_t, 0.0)  # Teacher is stop-gradient.
  # d/ds of τ²·KL(p_t ‖ softmax(s/τ)) = τ·(p_s − p_t).
  expected = rows(lambda s, t: tau * (ref_softmax(s / tau) - ref_softmax(t / tau)), Z_S, Z_T,
                  batch_shape=BATCH, num_classes=C)
  np.testing.assert_allclose(grad_s, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('exclude_target', [False, True])
def test_smooth_labels_matches_loop(exclude_target):
  epsilon = 0.2
  expected = np.zeros(BATCH + (C,))
  for index in np.ndindex(*BATCH):
    for k in range(C):
      if exclude_target:
        expected[index + (k,)] = 1 - epsilon if k == Y[index] else epsilon / (C - 1)
      else:
        expected[index + (k,)] = (1 - epsilon) * (k == Y[index]) + epsilon / C
  out = smooth_labels(Y, C, jnp.float32(epsilon), exclude_target=exclude_target)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.sum(-1), np.ones(BATCH), rtol=1e-6)
  # Hand values (C = 6, ε = 0.2): optax puts 0.8 + 0.2/6 on the label, Tf-KD/Zipf 0.8.
  label_mass = 0.8 if exclude_target else 0.8 + 0.2 / 6
  other_mass = 0.2 / 5 if exclude_target else 0.2 / 6
  np.testing.assert_allclose(out[0, 0, Y[0, 0]], label_mass, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, (Y[0, 0] + 1) % C], other_mass, rtol=1e-6)


def test_corrected_uniform_matches_loop():
  beta = 0.5
  expected = np.zeros(BATCH + (C,))
  for index in np.ndindex(*BATCH):
    for k in range(C):
      expected[index + (k,)] = beta if k == Y[index] else (1 - beta) / (C - 1)
  np.testing.assert_allclose(corrected_uniform(Y, C, beta), expected, rtol=1e-6)
  # β = 1/C gives the uniform teacher back.
  np.testing.assert_allclose(corrected_uniform(Y, C, 1 / C), np.full(BATCH + (C,), 1 / C),
                             rtol=1e-6)


# --------------------------------------------------------------------------------- CS-KD


def test_cskd_loss_matches_reference_and_stops_partner_gradient():
  expected = per_example(lambda a, p: ref_distillation_kl(a, p, 4.0), Z_S, Z_T,
                         batch_shape=BATCH)
  np.testing.assert_allclose(cskd_loss(Z_S, Z_T, 4.0), expected, rtol=RTOL, atol=ATOL * 16)
  grad_a, grad_p = jax.jit(jax.grad(sum_loss(losses.cskd_loss), argnums=(0, 1)))(
      Z_S, Z_T, 4.0)
  np.testing.assert_array_equal(grad_p, 0.0)
  assert np.max(np.abs(grad_a)) > 1e-3


# --------------------------------------------------------------------------------- PS-KD


def test_pskd_alpha_values_and_traced_under_jit():
  traces = []

  @jax.jit
  def alpha_at(epoch, total_epochs):
    traces.append(None)  # Runs only while tracing.
    return losses.pskd_alpha(epoch, total_epochs, 0.8)

  got = [alpha_at(jnp.int32(e), jnp.int32(300)) for e in (0, 149, 299)]
  np.testing.assert_allclose(got, [0.8 / 300, 0.4, 0.8], rtol=1e-6)
  assert len(traces) == 1  # One trace for every epoch: nothing specialises on its value.
  assert got[0].dtype == jnp.float32
  np.testing.assert_allclose(pskd_alpha(9, 10, 0.5), 0.5, rtol=1e-7)


def ref_pskd_targets(y, past, alpha):
  out = np.zeros(BATCH + (C,))
  for index in np.ndindex(*BATCH):
    a = alpha if np.ndim(alpha) == 0 else alpha[index]
    for k in range(C):
      out[index + (k,)] = (1 - a) * (k == y[index]) + a * past[index + (k,)]
  return out


def test_pskd_targets_scalar_alpha_matches_loop():
  out = pskd_targets(Y, PROBS, jnp.float32(0.3))
  np.testing.assert_allclose(out, ref_pskd_targets(Y, PROBS, 0.3), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out.sum(-1), np.ones(BATCH), rtol=1e-6)


def test_pskd_targets_per_example_alpha_and_epoch_zero():
  alpha = np.array([[0.0, 0.5, 1.0], [0.2, 0.0, 0.9]], np.float32)
  out = pskd_targets(Y, PROBS, alpha)
  np.testing.assert_allclose(out, ref_pskd_targets(Y, PROBS, alpha), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(out[0, 0], np.eye(C)[Y[0, 0]])  # α = 0: exactly one-hot.


def test_pskd_targets_rejects_class_shaped_alpha():
  with pytest.raises(ValueError):
    losses.pskd_targets(Y, PROBS, np.full(BATCH + (1,), 0.5, np.float32))


def test_pskd_targets_stop_gradient_into_past_probs_not_into_student():
  weights = random_logits(7, BATCH + (C,))

  def objectives(z, past):
    targets = losses.pskd_targets(Y, past, 0.5)
    return jnp.sum(weights * targets) + jnp.sum(losses.soft_cross_entropy(z, targets))

  grad_z, grad_past = jax.jit(jax.grad(objectives, argnums=(0, 1)))(Z_S, PROBS)
  np.testing.assert_array_equal(grad_past, 0.0)
  assert np.max(np.abs(grad_z)) > 1e-3


# ---------------------------------------------------------------------------------- Zipf


def test_vote_ranks_ties_share_minimum_rank():
  votes = np.array([[3, 3, 1, 0], [0, 5, 5, 5], [2, 2, 2, 2], [0, 1, 2, 3]], np.int32)
  ranks = jax.jit(zipf_module._vote_ranks)(votes)
  np.testing.assert_array_equal(ranks[0], [1, 1, 3, 4])
  np.testing.assert_array_equal(ranks, [ref_vote_ranks(v) for v in votes])


def dense_logits_with_votes(votes, num_classes, seed=0):
  """`[P, C]` logits whose per-position argmax gives exactly `votes`."""
  rng = np.random.default_rng(seed)
  winners = [k for k, count in enumerate(votes) for _ in range(count)]
  dense = rng.uniform(-1.0, 0.0, size=(len(winners), num_classes)).astype(np.float32)
  for position, k in enumerate(winners):
    dense[position, k] = 5.0
  return dense[rng.permutation(len(winners))]


def test_zipf_targets_rank_ties_hand_values():
  # Votes [3, 3, 1, 0] -> ranks [1, 1, 3, 4] -> weights [1, 1, 1/3, 1/4].
  dense = dense_logits_with_votes([3, 3, 1, 0], 4)
  out = zipf_targets(np.stack([dense, dense]), np.array([3, 0], np.int32))
  np.testing.assert_allclose(out[0], [3 / 7, 3 / 7, 1 / 7, 0.0], rtol=1e-6)
  np.testing.assert_allclose(out[1], [0.0, 12 / 19, 4 / 19, 3 / 19], rtol=1e-6)


def test_zipf_targets_matches_reference():
  # Small integer-valued logits over 9 positions make vote ties between classes likely.
  out = zipf_targets(DENSE, Y)
  assert out.shape == BATCH + (C,) and out.dtype == jnp.float32
  expected = rows(ref_zipf_targets, DENSE, Y, batch_shape=BATCH, num_classes=C)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(out)[IDX + (Y,)], 0.0)
  np.testing.assert_allclose(out.sum(-1), np.ones(BATCH), rtol=1e-6)


def test_zipf_targets_are_stop_gradient():
  weights = random_logits(8, BATCH + (C,))
  grad = jax.jit(jax.grad(lambda d: jnp.sum(weights * losses.zipf_targets(d, Y))))(
      random_logits(9, DENSE.shape))
  np.testing.assert_array_equal(grad, 0.0)


def test_zipf_loss_matches_reference():
  expected = per_example(ref_zipf_loss, Z_S, NON_TARGET, Y, batch_shape=BATCH)
  np.testing.assert_allclose(zipf_loss(Z_S, NON_TARGET, Y), expected, rtol=RTOL, atol=ATOL)


def test_zipf_loss_gradients_finite_with_zero_targets():
  grad_z, grad_t = jax.jit(jax.grad(sum_loss(losses.zipf_loss), argnums=(0, 1)))(
      Z_S, NON_TARGET, Y)
  assert np.all(np.isfinite(grad_z)) and np.all(np.isfinite(grad_t))
  # Student gradient of KL over the non-target softmax: q̂ − P on non-target classes, 0 on y.
  for index in np.ndindex(*BATCH):
    others = [k for k in range(C) if k != Y[index]]
    np.testing.assert_allclose(np.asarray(grad_z)[index][others],
                               ref_softmax(Z_S[index][others]) - NON_TARGET[index][others],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad_z)[IDX + (Y,)], 0.0)


def test_zipf_loss_ignores_target_class_exactly_in_bf16():
  value_and_grad = jax.jit(jax.value_and_grad(sum_loss(losses.zipf_loss)))
  huge, small = Z_S.copy(), Z_S.copy()
  huge[IDX + (Y,)] = 1e30  # `z − 1000·mask` would not remove this class.
  small[IDX + (Y,)] = -7.0
  value_huge, grad_huge = value_and_grad(jnp.asarray(huge, jnp.bfloat16), NON_TARGET, Y)
  value_small, _ = value_and_grad(jnp.asarray(small, jnp.bfloat16), NON_TARGET, Y)
  grad_huge = np.asarray(grad_huge, np.float32)
  assert np.isfinite(value_huge) and np.all(np.isfinite(grad_huge))
  assert float(value_huge) == float(value_small)
  np.testing.assert_array_equal(grad_huge[IDX + (Y,)], 0.0)
  expected = per_example(ref_zipf_loss, bf16_round(Z_S), NON_TARGET, Y, batch_shape=BATCH)
  np.testing.assert_allclose(float(value_huge), expected.sum(), rtol=1e-5)


# ----------------------------------------------------------------------------------- DKD


@pytest.mark.parametrize('alpha,beta,temperature', [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0),
                                                    (1.0, 0.0, 2.0), (0.0, 1.0, 2.0)])
def test_dkd_loss_matches_reference(alpha, beta, temperature):
  expected = per_example(lambda s, t, y: ref_dkd(s, t, y, alpha, beta, temperature),
                         Z_S, Z_T, Y, batch_shape=BATCH)
  # Traced weights and temperature: the four cases share one compilation.
  out = dkd_loss(Z_S, Z_T, Y, alpha=jnp.float32(alpha), beta=jnp.float32(beta),
                 temperature=jnp.float32(temperature))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dkd_loss_defaults_are_mdistiller_cifar():
  expected = per_example(lambda s, t, y: ref_dkd(s, t, y, 1.0, 8.0, 4.0), Z_S, Z_T, Y,
                         batch_shape=BATCH)
  np.testing.assert_allclose(dkd_loss(Z_S, Z_T, Y), expected, rtol=1e-5, atol=1e-5)


def test_dkd_loss_stops_gradient_into_teacher():
  grad_s, grad_t = jax.jit(jax.grad(sum_loss(losses.dkd_loss), argnums=(0, 1)))(Z_S, Z_T, Y)
  np.testing.assert_array_equal(grad_t, 0.0)
  assert np.max(np.abs(grad_s)) > 1e-3


def test_dkd_loss_target_masking_exact_in_bf16_with_huge_target_logit():

  def loss(s, t, alpha, beta):
    return jnp.sum(losses.dkd_loss(s, t, Y, alpha=alpha, beta=beta, temperature=1.0))

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  s_huge, t_huge = Z_S.copy(), Z_T.copy()
  s_huge[IDX + (Y,)], t_huge[IDX + (Y,)] = 1e30, 3e4
  s_small, t_small = Z_S.copy(), Z_T.copy()
  s_small[IDX + (Y,)], t_small[IDX + (Y,)] = -5.0, 0.0
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)

  # NCKD alone (α = 0) must not see the target class at all, whatever its logit.
  value_huge, grad_huge = value_and_grad(bf16(s_huge), bf16(t_huge), 0.0, 1.0)
  value_small, _ = value_and_grad(bf16(s_small), bf16(t_small), 0.0, 1.0)
  grad_huge = np.asarray(grad_huge, np.float32)
  assert np.isfinite(value_huge) and np.all(np.isfinite(grad_huge))
  assert float(value_huge) == float(value_small)
  np.testing.assert_array_equal(grad_huge[IDX + (Y,)], 0.0)

  # The full loss (TCKD with p_y rounding to 1) stays finite in value and gradient.
  value, grad = value_and_grad(bf16(s_huge), bf16(t_huge), 1.0, 8.0)
  assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))


# ------------------------------------------------------------------------------- RAS-KD


def test_relation_matrix_matches_reference():
  out = relation_matrix(PROTOTYPES, jnp.float32(0.1))
  np.testing.assert_allclose(out, ref_relation_matrix(PROTOTYPES, 0.1), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.diagonal(out), 0.0)
  np.testing.assert_allclose(out.sum(-1), np.ones(C), rtol=1e-6)


def test_relation_matrix_zero_prototype_bf16_and_gradients_finite():
  prototypes = PROTOTYPES.copy()
  prototypes[1] = 0.0  # e.g. a class not seen yet.
  out = relation_matrix(jnp.asarray(prototypes, jnp.bfloat16), 0.1)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.diagonal(out), 0.0)
  np.testing.assert_allclose(out.sum(-1), np.ones(C), rtol=1e-6)
  np.testing.assert_allclose(out, ref_relation_matrix(bf16_round(prototypes), 0.1),
                             rtol=1e-4, atol=1e-6)
  weights = random_logits(10, (C, C))
  grad = jax.jit(jax.grad(lambda v: jnp.sum(weights * losses.relation_matrix(v, 0.1))))(
      prototypes)
  assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 1e-3


# ------------------------------------------------------------------------------ ReffAKD

# Counts per class: 3, 1, 4, 0, 2, 1 (class 1: no same-class pair; class 3: no sample),
# plus one sample with an out-of-range label (ignored) and one all-zero embedding.
EMB_LABELS = np.array([2, 0, 4, 2, 1, 0, 2, 4, 0, 2, -1, 5], np.int32)
EMBEDDINGS = np.abs(random_logits(11, (len(EMB_LABELS), 2, 3)))  # Trailing dims flattened.
EMBEDDINGS[3] *= 7.0
EMBEDDINGS[8] = 0.0


def test_class_similarity_uneven_counts_matches_pair_loop():
  out = class_similarity(EMBEDDINGS, EMB_LABELS, C, 0.0225)
  assert out.shape == (C, C) and out.dtype == jnp.float32
  expected = ref_class_similarity(EMBEDDINGS, EMB_LABELS, C, 0.0225)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, out.T, atol=1e-7)
  np.testing.assert_allclose(out[1, 1], 0.0225, rtol=1e-6)  # One sample: no same-class pair.
  np.testing.assert_array_equal(np.asarray(out)[3, [0, 1, 2, 4, 5]], 0.0)  # Empty class.


@pytest.mark.parametrize('temperature', [1.0, 0.05])
def test_reffakd_soft_labels_matches_reference(temperature):
  similarity = ref_class_similarity(EMBEDDINGS, EMB_LABELS, C, 0.0225).astype(np.float32)
  expected = np.stack([ref_softmax(row / temperature) for row in similarity.astype(np.float64)])
  out = reffakd_soft_labels(similarity, jnp.float32(temperature))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
  if temperature == 1.0:  # The faithful default.
    np.testing.assert_allclose(jax.jit(losses.reffakd_soft_labels)(similarity), expected,
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- private helpers


def test_masked_log_softmax_exact_in_bf16():
  logits = jnp.asarray([[1e30, 1.0, 2.0, -3.0], [0.5, 3e4, -1.0, 0.0]], jnp.bfloat16)
  mask = np.array([[True, False, False, False], [False, True, False, False]])
  weights = random_logits(12, (2, 4))

  def weighted(z):
    probs = _common.masked_log_softmax(_common.to_float(z), mask)[1]
    return jnp.sum(weights * probs), probs

  grad, probs = jax.jit(jax.grad(weighted, has_aux=True))(logits)
  np.testing.assert_array_equal(np.asarray(probs)[mask], 0.0)
  np.testing.assert_allclose(probs.sum(-1), [1.0, 1.0], rtol=1e-6)
  grad = np.asarray(grad, np.float32)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[mask], 0.0)


# ------------------------------------------------------------------------ bf16 vs fp32

# name -> (jitted function of the float inputs, float inputs); the fp32 calls reuse the
# compilations of the tests above.
BF16_CASES = {
    'cross_entropy': (lambda z: cross_entropy(z, Y), (Z_S,)),
    'soft_cross_entropy': (soft_cross_entropy, (Z_S, PROBS)),
    'distillation_kl': (lambda s, t: distillation_kl(s, t, jnp.float32(4.0)), (Z_S, Z_T)),
    'cskd_loss': (lambda s, t: cskd_loss(s, t, 4.0), (Z_S, Z_T)),
    'pskd_targets': (lambda p: pskd_targets(Y, p, jnp.float32(0.3)), (PROBS,)),
    'zipf_targets': (lambda d: zipf_targets(d, Y), (random_logits(13, DENSE.shape),)),
    'zipf_loss': (lambda z, t: zipf_loss(z, t, Y), (Z_S, NON_TARGET)),
    'dkd_loss': (lambda s, t: dkd_loss(s, t, Y), (Z_S, Z_T)),
    'relation_matrix': (lambda v: relation_matrix(v, jnp.float32(0.1)), (PROTOTYPES,)),
    'class_similarity': (lambda e: class_similarity(e, EMB_LABELS, C, 0.0225), (EMBEDDINGS,)),
    'reffakd_soft_labels': (lambda s: reffakd_soft_labels(s, jnp.float32(0.05)),
                            (ref_class_similarity(EMBEDDINGS, EMB_LABELS, C, 0.0225),)),
}


@pytest.mark.parametrize('name', sorted(BF16_CASES))
def test_bf16_inputs_are_upcast_and_close_to_fp32(name):
  fn, inputs = BF16_CASES[name]
  out_bf16 = fn(*[jnp.asarray(x, jnp.bfloat16) for x in inputs])
  assert out_bf16.dtype == jnp.float32
  assert np.all(np.isfinite(out_bf16))
  # Computed in fp32: equal (to fp32 rounding) to fp32 on the bf16-rounded inputs. A bf16
  # computation would be off by ~1e-2 here.
  np.testing.assert_allclose(out_bf16, fn(*[bf16_round(x) for x in inputs]), rtol=1e-6,
                             atol=1e-6)
  # And close to the fp32 result on the unrounded inputs (bf16 keeps 8 mantissa bits).
  np.testing.assert_allclose(out_bf16, fn(*inputs), rtol=5e-2, atol=5e-2)
