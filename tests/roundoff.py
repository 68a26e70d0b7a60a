"""Tolerances for comparing two computations that differ only in the order of float32 sums.

1 vs 4 devices, pmap vs shard_map, one eval batch size vs another: the arithmetic is the same,
but XLA's CPU kernels block and order their reductions by what they find on the machine
(instruction set, cache sizes, threads), and a sharded run sums per device first. Two orders of
a float32 sum of n terms differ by at most about 2·n·u·Σ|x_i| (u = 2^-24, each order's error is
bounded by (n-1)·u·Σ|x_i|), and in practice by about √n·u·Σ|x_i|. So:

- Compare each array relative to its **scale** (its largest magnitude), not element by element:
  an element that is a near-cancelling sum carries the rounding error of its terms, which is
  proportional to the terms, not to the result. `assert_close_to_scale` does this.
- Compare only what is well-conditioned. Training amplifies round-off wherever a decision flips
  on it: max-pooling LeNet-5-BN over Fashion-MNIST's constant backgrounds routes the gradient
  through near-ties, and 1 vs 4 devices go from 1e-6 apart to 1e-2 after four steps. Whole runs
  are compared on the MLP (no pooling); convolutional models for at most two steps.
- Integers (counts, argmaxes of well-separated logits, the step) are compared exactly, and so is
  anything the same machine computes in the same order (resume after a kill is bitwise).

The test suite is run a second time under another XLA CPU configuration (`.ci/run`), so a
tolerance that holds on one machine only fails before it lands.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 2^-23 = 2u: one float32 ulp at 1.0
BF16_STEP = 2.0**-7  # one bfloat16 ulp at 1.0 (7 stored mantissa bits)

# Whole-run comparisons (16 steps of SGD with momentum, batch 64, widths up to 784): every step's
# sums are ~√784·u ≈ 1e-6 apart relative to their scale and the run carries that forward.
# Measured: ≤ 8·EPS (1e-6) on the MLP under three XLA CPU configurations (native, AVX2 without
# Eigen threads, SSE4.2 with 128-bit vectors). 2^10·EPS ≈ 1.2e-4 leaves > 100× headroom and is
# still 100× below what a missing collective produces (a per-device BatchNorm statistic, gradient
# or table row differs by ≥ 1e-2).
RUN_RTOL = 2.0**10 * EPS

# One or two steps (a single update of a method's state, one train step): a handful of reductions
# of at most a few thousand terms, 2^7·EPS ≈ 1.5e-5 of the scale (√4096·u ≈ 4e-6 per sum).
STEP_RTOL = 2.0**7 * EPS

# The logits of a deep network's forward pass (ResNet-18: ~20 layers of sums of up to 3·3·512
# terms, each ~√4608·u ≈ 4e-6 of its scale) carry every layer's rounding: measured up to 36% of
# STEP_RTOL; 2^10·EPS leaves ~10× headroom.
DEEP_FORWARD_RTOL = 2.0**10 * EPS


def _report(name, actual, expected, atol):
  """With ROUNDOFF_REPORT=<file>, append how much of each tolerance a comparison used, to check
  the headroom of these tolerances on a new machine or XLA configuration."""
  path = os.environ.get("ROUNDOFF_REPORT")
  if path and atol > 0:
    used = float(np.abs(actual - expected).max()) / atol if actual.size else 0.0
    with open(path, "a") as f:
      f.write(f"{used:.3e} {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} {name}\n")


def assert_close_to_scale(actual, expected, rtol, err_msg=""):
  """`|actual - expected| <= rtol * max|expected|` elementwise (and the same shape and dtype kind).

  The scale of an array is its largest magnitude: what the rounding error of the sums that made
  it is proportional to. An all-zero `expected` must be matched exactly.
  """
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (err_msg, actual.shape, expected.shape)
  scale = float(np.abs(expected).max()) if expected.size else 0.0
  _report(err_msg, actual, expected, rtol * scale)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale, err_msg=err_msg)


def assert_trees_close_to_scale(actual, expected, rtol):
  """`assert_close_to_scale` leaf by leaf (integer leaves exactly), naming the failing path.

  A leaf's scale is the largest magnitude in its group (the first two keys of its path, e.g.
  `opt_state[1]`, `method_state.exit_params`), or its own if larger. Rounding in a backward pass
  is proportional to the magnitudes that flow through it, and a leaf that cancels to nearly zero
  carries the rounding of terms as large as its neighbours': a BatchNorm scale followed by
  another normalisation has a zero gradient up to rounding, so its momentum trace is pure
  rounding noise of the surrounding gradients.
  """
  paths_and_expected = jax.tree_util.tree_leaves_with_path(expected)
  actual_leaves = jax.tree.leaves(actual)
  assert len(actual_leaves) == len(paths_and_expected)
  group_scale = {}
  for path, b in paths_and_expected:
    b = np.asarray(b)
    if b.dtype.kind not in "biu" and b.size:
      group = jax.tree_util.keystr(path[:2])
      group_scale[group] = max(group_scale.get(group, 0.0),
                               float(np.abs(b.astype(np.float32)).max()))
  for (path, b), a in zip(paths_and_expected, actual_leaves):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if b.dtype.kind in "biu":
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    a, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    assert a.shape == b32.shape, name
    atol = rtol * group_scale.get(jax.tree_util.keystr(path[:2]), 0.0)
    # Values a rounding apart may round to neighbouring bfloat16 numbers: one bf16 step (8
    # significant bits) relative to the element, on top of the float32 tolerance.
    elementwise = BF16_STEP if b.dtype == jnp.bfloat16 else 0.0
    if not elementwise:
      _report(name, a, b32, atol)
    np.testing.assert_allclose(a, b32, rtol=elementwise, atol=atol, err_msg=name)
