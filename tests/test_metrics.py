"""Tests of `selfkd_jax.metrics` against independent numpy references, and of evaluation.

The references below loop over examples and bins on purpose and work in float64 from the
definitions (Guo et al. 2017 for ECE, Geifman et al. 2019 for AURC); they share no code with
the library. The last tests run `Experiment.evaluate` on 1 and 4 (fake CPU) devices with the
same parameters and check that the metrics are identical and cover every test example once.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import roundoff
from selfkd_jax import data as data_lib
from selfkd_jax import metrics
from selfkd_jax.train import loop
from test_train import tiny_config  # tests/ is on sys.path (rootdir conftest, no __init__)

per_example_stats = jax.jit(metrics.per_example_stats)


# ----------------------------------------------------------------------------- references


def ref_per_example(logits, labels):
  """Max softmax probability, argmax == label, label in the 5 largest (argsort), NLL."""
  logits = np.asarray(logits, np.float64)
  conf, correct, top5, nll = [], [], [], []
  for row, label in zip(logits, labels):
    shifted = row - row.max()
    probs = np.exp(shifted) / np.exp(shifted).sum()
    conf.append(probs.max())
    correct.append(float(np.argmax(row) == label))
    top5.append(float(label in np.argsort(-row)[:5]))
    nll.append(-np.log(probs[label]))
  return {"confidence": np.array(conf), "correct": np.array(correct),
          "top5_correct": np.array(top5), "nll": np.array(nll)}


def ref_ece(confidence, correct, num_bins):
  """Guo et al.: sum over bins (b/M, (b+1)/M] of (n_b / N) |acc_b - conf_b|; 0 goes to bin 0."""
  confidence = [float(c) for c in confidence]
  correct = [float(c) for c in correct]
  n = len(confidence)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    members = [i for i, c in enumerate(confidence) if lo < c <= hi or (b == 0 and c == 0.0)]
    if not members:
      continue
    acc = sum(correct[i] for i in members) / len(members)
    conf = sum(confidence[i] for i in members) / len(members)
    total += len(members) / n * abs(acc - conf)
  return total


def ref_bin_of(c, num_bins):
  """The bin (b/M, (b+1)/M] holding c (0 in bin 0), by comparisons only."""
  matches = [b for b in range(num_bins)
             if b / num_bins < c <= (b + 1) / num_bins or (b == 0 and c == 0.0)]
  assert len(matches) == 1, (c, matches)
  return matches[0]


def ref_aurc(confidence, correct):
  """O(N^2): for k = 1..N, the error rate among the k most confident; the mean over k.

  Needs distinct confidences (then "the k most confident" is one set).
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  assert len(np.unique(confidence)) == len(confidence)
  n = len(confidence)
  risks = []
  for k in range(1, n + 1):
    kth_largest = np.sort(confidence)[::-1][k - 1]
    accepted = confidence >= kth_largest
    assert accepted.sum() == k
    risks.append(float(np.sum(1.0 - correct[accepted])) / k)
  return sum(risks) / n


def random_stats(rng, n):
  """Distinct confidences in (0.1, 1) and correctness that rises with confidence (calibrated-ish)."""
  confidence = rng.uniform(0.1, 1.0, size=n)
  assert len(np.unique(confidence)) == n
  correct = (rng.uniform(size=n) < confidence ** 1.5).astype(np.float64)
  return confidence, correct


# ----------------------------------------------------------------------------- per_example_stats


@pytest.mark.parametrize("num_classes,scale", [(10, 1.0), (10, 30.0), (100, 3.0)])
def test_per_example_stats_matches_numpy(num_classes, scale):
  rng = np.random.default_rng(num_classes + int(scale))
  logits = (rng.normal(size=(64, num_classes)) * scale).astype(np.float32)
  labels = rng.integers(0, num_classes, size=64).astype(np.int32)
  # Make top-1 and top-5 non-trivial: some labels are the argmax, some are 2nd..6th.
  order = np.argsort(-logits, axis=-1)
  labels[:10] = order[:10, 0]
  labels[10:20] = order[10:20, 4]
  labels[20:30] = order[20:30, 5]
  got = jax.device_get(per_example_stats(jnp.asarray(logits), jnp.asarray(labels)))
  want = ref_per_example(logits, labels)
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == np.float32 and got[key].shape == (64,), key
  np.testing.assert_array_equal(got["correct"], want["correct"])
  np.testing.assert_array_equal(got["top5_correct"], want["top5_correct"])
  np.testing.assert_allclose(got["confidence"], want["confidence"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-5, atol=1e-5)
  assert np.all(got["correct"][:10] == 1) and np.all(got["top5_correct"][10:20] == 1)
  assert np.all(got["top5_correct"][20:30] == 0)
  assert np.all(got["confidence"] <= 1.0)


def test_per_example_stats_ties_and_leading_dims():
  """Ties: top-5 counts classes with a *strictly* larger logit, so ties favour the label.

  Top-1 is `argmax == label`, and argmax takes the first of tied maxima, so a label tied for
  the maximum is top-1 correct only if it is the first of them. (np.argsort would not favour
  the label: with six logits tied at the top, argsort's first five may leave it out.)
  """
  logits = np.array([
      [5, 5, 5, 5, 5, 5, 0, 0, 0, 0],  # label 5: tied with 5 others at the top -> top-5 yes
      [5, 5, 5, 5, 5, 5, 0, 0, 0, 0],  # label 0: first of the tied maxima -> top-1 yes
      [9, 8, 7, 6, 5, 4, 4, 0, 0, 0],  # label 6: 5 strictly larger (9..5) -> top-5 no
      [9, 8, 7, 6, 4, 4, 4, 0, 0, 0],  # label 6: 4 strictly larger, tied with 4, 5 -> top-5 yes
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # label 3: all equal -> top-5 yes, top-1 no (argmax 0)
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 7],  # label 9: unique max -> both
  ], np.float32)
  labels = np.array([5, 0, 6, 6, 3, 9], np.int32)
  got = jax.device_get(per_example_stats(jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_array_equal(got["top5_correct"], [1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(got["correct"], [0, 1, 0, 0, 0, 1])
  # Uniform row: confidence 1/10, NLL log 10.
  np.testing.assert_allclose(got["confidence"][4], 0.1, rtol=1e-6)
  np.testing.assert_allclose(got["nll"][4], np.log(10.0), rtol=1e-6)
  # argsort (stable) on row 0 would put classes 0..4 first and miss label 5:
  assert 5 not in np.argsort(-logits[0], kind="stable")[:5]

  # Leading batch dimensions [2, 3, C] give [2, 3] outputs equal to the flat ones.
  folded = jax.device_get(per_example_stats(jnp.asarray(logits.reshape(2, 3, 10)),
                                            jnp.asarray(labels.reshape(2, 3))))
  for key in got:
    np.testing.assert_array_equal(folded[key].reshape(-1), got[key])


def test_per_example_stats_bfloat16_gives_float32():
  rng = np.random.default_rng(7)
  # Distinct logits exactly representable in bfloat16 (multiples of 1/2 up to 10), so the
  # argsort reference has no ties to break and the bf16 cast loses nothing.
  values = np.stack([rng.permutation(20) for _ in range(32)]).astype(np.float32) * 0.5 - 5.0
  labels = rng.integers(0, 20, size=32).astype(np.int32)
  labels[:8] = np.argsort(-values[:8], axis=-1)[:, 3]  # top-5 but not top-1
  logits = jnp.asarray(values, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(logits, np.float32), values)
  got = jax.device_get(per_example_stats(logits, jnp.asarray(labels)))
  want = ref_per_example(values, labels)
  for key in want:
    assert got[key].dtype == np.float32, key
  np.testing.assert_array_equal(got["correct"], want["correct"])
  np.testing.assert_array_equal(got["top5_correct"], want["top5_correct"])
  # Computed in float32 after the cast: float32 accuracy, not bfloat16's (~4e-3).
  np.testing.assert_allclose(got["confidence"], want["confidence"], rtol=1e-5)
  np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- ECE


def ece(confidence, correct, num_bins):
  return metrics.expected_calibration_error(
      metrics.calibration_bins(confidence, correct, num_bins))


@pytest.mark.parametrize("num_bins", [15, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_loop_definition(num_bins, seed):
  rng = np.random.default_rng(seed)
  confidence, correct = random_stats(rng, 500)
  np.testing.assert_allclose(ece(confidence, correct, num_bins),
                             ref_ece(confidence, correct, num_bins), rtol=1e-12, atol=1e-15)
  # float32 confidences (what the device returns) are binned by their exact value too.
  conf32 = confidence.astype(np.float32)
  np.testing.assert_allclose(ece(conf32, correct.astype(np.float32), num_bins),
                             ref_ece(conf32.astype(np.float64), correct, num_bins),
                             rtol=1e-12, atol=1e-15)
  assert metrics.ECE_BINS == 15


def test_ece_hand_examples():
  # 4 examples, 15 bins:
  #   0.95, 0.95 (correct, wrong) -> bin 14 (14/15=0.933, 1]: acc 0.5, conf 0.95, gap 0.45, w 2/4
  #   0.55 (correct)              -> bin 8 (0.533, 0.6]:      acc 1,   conf 0.55, gap 0.45, w 1/4
  #   0.25 (wrong)                -> bin 3 (0.2, 0.267]:      acc 0,   conf 0.25, gap 0.25, w 1/4
  # ECE = 0.225 + 0.1125 + 0.0625 = 0.4. With 10 bins the groups fall in bins 9, 5, 2: also 0.4.
  confidence = np.array([0.95, 0.95, 0.55, 0.25])
  correct = np.array([1.0, 0.0, 1.0, 0.0])
  assert ece(confidence, correct, 15) == pytest.approx(0.4, abs=1e-12)
  assert ece(confidence, correct, 10) == pytest.approx(0.4, abs=1e-12)
  bins = metrics.calibration_bins(confidence, correct, 15)
  want_count = np.zeros(15)
  want_count[[14, 8, 3]] = [2, 1, 1]
  np.testing.assert_array_equal(bins["count"], want_count)
  np.testing.assert_allclose(bins["confidence_sum"][[14, 8, 3]], [1.9, 0.55, 0.25])
  np.testing.assert_array_equal(bins["correct_sum"][[14, 8, 3]], [1, 1, 0])

  # 2 examples where the bin count matters:
  #   15 bins: 0.62 -> bin 9 (0.6, 0.667], 0.68 -> bin 10 (0.667, 0.733]: separate bins,
  #            ECE = (|1 - 0.62| + |0 - 0.68|) / 2 = (0.38 + 0.68) / 2 = 0.53
  #   10 bins: both in (0.6, 0.7]: acc 0.5, conf 0.65 -> ECE = 0.15
  confidence = np.array([0.62, 0.68])
  correct = np.array([1.0, 0.0])
  assert ece(confidence, correct, 15) == pytest.approx(0.53, abs=1e-12)
  assert ece(confidence, correct, 10) == pytest.approx(0.15, abs=1e-12)

  # Perfect calibration within one bin gives 0; no examples gives 0.
  assert ece(np.array([0.75] * 4), np.array([1.0, 1.0, 1.0, 0.0]), 15) == pytest.approx(0.0)
  assert ece(np.zeros(0), np.zeros(0), 15) == 0.0


@pytest.mark.parametrize("num_bins", [15, 10])
def test_ece_bin_edges(num_bins):
  """Confidences exactly on b/M go to bin b-1 (bins are (lo, hi]); 0 goes to bin 0.

  Also one float64 ulp either side of each edge, and the float32 roundings of the edges
  (binned by their exact value, which lies just above or below b/M).
  """
  edges = np.arange(0, num_bins + 1) / num_bins
  above = np.nextafter(edges[:-1], 2.0)
  below = np.nextafter(edges[1:], -1.0)
  edges32 = edges.astype(np.float32)
  for confidence in (edges, above, below, edges32.astype(np.float64)):
    for c in confidence:
      bins = metrics.calibration_bins(np.array([c]), np.array([1.0]), num_bins)
      assert int(np.argmax(bins["count"])) == ref_bin_of(c, num_bins), (c, num_bins)
  # Exact edges: k/M for k = 1..M lands in bin k - 1, and 0 in bin 0.
  bins = metrics.calibration_bins(edges, np.ones_like(edges), num_bins)
  want = np.ones(num_bins)
  want[0] = 2  # 0 and 1/M
  np.testing.assert_array_equal(bins["count"], want)

  # ECE on edge-heavy data against the loop.
  rng = np.random.default_rng(num_bins)
  confidence = np.concatenate([edges, above, below, edges32.astype(np.float64)])
  correct = (rng.uniform(size=len(confidence)) < 0.6).astype(np.float64)
  np.testing.assert_allclose(ece(confidence, correct, num_bins),
                             ref_ece(confidence, correct, num_bins), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- mergeable bins


@pytest.mark.parametrize("num_bins", [15, 10])
def test_calibration_bins_add_up_across_shards(num_bins):
  rng = np.random.default_rng(3)
  confidence, correct = random_stats(rng, 1000)
  confidence[:15] = np.arange(1, 16) / 15  # some on edges too
  whole = metrics.calibration_bins(confidence, correct, num_bins)
  cuts = [0, 1, 1, 137, 500, 777, 1000]  # uneven shards, one empty
  shards = [metrics.calibration_bins(confidence[a:b], correct[a:b], num_bins)
            for a, b in zip(cuts[:-1], cuts[1:])]
  summed = {k: sum(s[k] for s in shards) for k in whole}
  assert set(whole) == {"count", "confidence_sum", "correct_sum"}
  for key in whole:
    assert whole[key].shape == (num_bins,)
  np.testing.assert_array_equal(summed["count"], whole["count"])
  np.testing.assert_array_equal(summed["correct_sum"], whole["correct_sum"])
  np.testing.assert_allclose(summed["confidence_sum"], whole["confidence_sum"], rtol=1e-12)
  assert whole["count"].sum() == 1000
  np.testing.assert_allclose(metrics.expected_calibration_error(summed),
                             metrics.expected_calibration_error(whole), rtol=1e-12)
  np.testing.assert_allclose(metrics.expected_calibration_error(summed),
                             ref_ece(confidence, correct, num_bins), rtol=1e-12)


# ----------------------------------------------------------------------------- AURC


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 300), (3, 300)])
def test_aurc_matches_quadratic_definition(seed, n):
  rng = np.random.default_rng(seed)
  confidence, correct = random_stats(rng, n)
  np.testing.assert_allclose(metrics.area_under_risk_coverage(confidence, correct),
                             ref_aurc(confidence, correct), rtol=1e-12)
  # Only the order of the confidences matters.
  np.testing.assert_allclose(metrics.area_under_risk_coverage(confidence ** 3, correct),
                             ref_aurc(confidence, correct), rtol=1e-12)


def test_aurc_hand_examples():
  confidence = np.array([0.9, 0.8, 0.7, 0.6])
  assert metrics.area_under_risk_coverage(confidence, np.ones(4)) == 0.0
  assert metrics.area_under_risk_coverage(confidence, np.zeros(4)) == 1.0
  # Perfect ranking, the 2 errors least confident: risks at k = 1..4 are 0, 0, 1/3, 2/4,
  # AURC = (0 + 0 + 1/3 + 1/2) / 4 = 5/24.
  assert metrics.area_under_risk_coverage(confidence, np.array([1.0, 1, 0, 0])) == (
      pytest.approx(5 / 24, abs=1e-15))
  # Worst ranking, the 2 errors most confident: risks 1, 1, 2/3, 2/4 -> (19/6) / 4 = 19/24.
  assert metrics.area_under_risk_coverage(confidence, np.array([0.0, 0, 1, 1])) == (
      pytest.approx(19 / 24, abs=1e-15))
  # Input order does not matter, only the confidences.
  perm = [2, 0, 3, 1]
  assert metrics.area_under_risk_coverage(confidence[perm], np.array([1.0, 1, 0, 0])[perm]) == (
      pytest.approx(5 / 24, abs=1e-15))
  # Perfect ranking in general: e errors of N, risk 0 until k = N - e, then (k - N + e) / k.
  n, e = 10, 3
  closed = sum(max(0, k - (n - e)) / k for k in range(1, n + 1)) / n
  conf = np.linspace(1.0, 0.1, n)
  corr = np.array([1.0] * (n - e) + [0.0] * e)
  assert metrics.area_under_risk_coverage(conf, corr) == pytest.approx(closed, abs=1e-15)
  assert np.isnan(metrics.area_under_risk_coverage(np.zeros(0), np.zeros(0)))


# ----------------------------------------------------------------------------- all metrics


def test_classification_metrics_keys_and_hand_example():
  stats = {
      "confidence": np.array([0.62, 0.68], np.float32),
      "correct": np.array([1.0, 0.0], np.float32),
      "top5_correct": np.array([1.0, 1.0], np.float32),
      "nll": np.array([0.5, 1.5], np.float32),
  }
  got = metrics.classification_metrics(stats)
  assert set(got) == {"top1", "top5", "nll", "ece", "ece_10bins", "aurc"}
  assert all(type(v) is float for v in got.values())
  # ECE as in test_ece_hand_examples (15 bins: 0.53, 10 bins: 0.15; float32 inputs -> 1e-6).
  # AURC: the wrong 0.68 is accepted first: risks 1, 1/2 -> 0.75.
  want = {"top1": 0.5, "top5": 1.0, "nll": 1.0, "ece": 0.53, "ece_10bins": 0.15, "aurc": 0.75}
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key


def test_classification_metrics_from_logits_end_to_end():
  rng = np.random.default_rng(11)
  logits = (rng.normal(size=(400, 10)) * 2.0).astype(np.float32)
  labels = rng.integers(0, 10, size=400).astype(np.int32)
  labels[:150] = np.argmax(logits[:150], axis=-1)
  stats = jax.device_get(per_example_stats(jnp.asarray(logits), jnp.asarray(labels)))
  got = metrics.classification_metrics(stats)
  want = ref_per_example(logits, labels)
  assert got["top1"] == pytest.approx(want["correct"].mean(), abs=1e-12)
  assert got["top5"] == pytest.approx(want["top5_correct"].mean(), abs=1e-12)
  assert got["nll"] == pytest.approx(want["nll"].mean(), rel=1e-5)
  assert got["ece"] == pytest.approx(ref_ece(want["confidence"], want["correct"], 15), abs=1e-5)
  assert got["ece_10bins"] == pytest.approx(
      ref_ece(want["confidence"], want["correct"], 10), abs=1e-5)
  assert got["aurc"] == pytest.approx(ref_aurc(want["confidence"], want["correct"]), abs=1e-6)


# ----------------------------------------------------------------------------- evaluate


def _experiment(workdir, **overrides):
  """An `Experiment` and its seed-0 initial state, compiled."""
  exp = loop.Experiment(tiny_config(**overrides), str(workdir))
  state = exp.runner.init_state(exp.init_fn())
  exp.compile(state)
  return exp, state


def _evaluate(exp, state, monkeypatch):
  """`exp.evaluate(state)` and the merged per-example stats it computed the metrics from."""
  captured = []

  def capture(stats):
    captured.append({k: np.array(v) for k, v in stats.items()})
    return metrics.classification_metrics(stats)

  monkeypatch.setattr(loop, "classification_metrics", capture)
  result = exp.evaluate(state)
  monkeypatch.undo()
  assert len(captured) == 1
  return result, captured[0]


@pytest.mark.cross_device
def test_evaluate_independent_of_devices_and_covers_each_example_once(tmp_path, monkeypatch):
  exp1, state1 = _experiment(tmp_path / "one", num_devices=1)
  exp4, state4 = _experiment(tmp_path / "four", num_devices=4)
  assert exp1.eval_batch_size() == 1000 and len(exp4.devices) == 4
  m1, s1 = _evaluate(exp1, state1, monkeypatch)
  m4, s4 = _evaluate(exp4, state4, monkeypatch)
  # 10000 = 104 * 96 + 16: the last batch has 80 padding rows (mask 0, label 0, zero image).
  # (`eval_batch_size()` reads the config at every pass, so the same Experiment serves.)
  exp4.config.eval_batch_size = 96
  assert exp4.eval_batch_size() == 96
  m96, s96 = _evaluate(exp4, state4, monkeypatch)
  assert set(m1) == {"top1", "top5", "nll", "ece", "ece_10bins", "aurc", "calibration_bins"}

  # The same seed gives the same parameters on 1 and 4 devices.
  for a, b in zip(jax.tree.leaves(state1.variables()), jax.tree.leaves(state4.variables())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The per-example numbers come from forward passes over batches of 1000, 250 and 96 rows,
  # which XLA blocks and sums differently: equal to round-off at the scale of each stat
  # (confidences <= 1), correctness exactly (no near-tied top logits in this model's outputs).
  for stats in (s4, s96):
    np.testing.assert_array_equal(stats["correct"], s1["correct"])
    np.testing.assert_array_equal(stats["top5_correct"], s1["top5_correct"])
    for key in ("confidence", "nll"):
      roundoff.assert_close_to_scale(stats[key], s1[key], roundoff.STEP_RTOL, err_msg=key)
  max_nll = float(np.max(s1["nll"]))
  for other in (m4, m96):
    assert other["top1"] == m1["top1"] and other["top5"] == m1["top5"]
    # Means of per-example values each within STEP_RTOL of their scale.
    assert other["nll"] == pytest.approx(m1["nll"], abs=roundoff.STEP_RTOL * max_nll)
    for key in ("ece", "ece_10bins"):  # |sum of gaps| moves by at most the confidences' error
      assert other[key] == pytest.approx(m1[key], abs=roundoff.STEP_RTOL), key
    # AURC ranks by confidence: a swap of two near-equal confidences at rank k moves it by at
    # most 1/(k N); none happens here, so it agrees like the confidences do.
    assert other["aurc"] == pytest.approx(m1["aurc"], abs=roundoff.STEP_RTOL)
    # The bin counts are exact across device counts and batch sizes; the sums of n_b
    # confidences (each <= 1, each within STEP_RTOL) within n_b * STEP_RTOL.
    counts = np.asarray(m1["calibration_bins"]["count"])
    assert other["calibration_bins"]["count"] == m1["calibration_bins"]["count"]
    for key in ("confidence_sum", "correct_sum"):
      np.testing.assert_allclose(other["calibration_bins"][key], m1["calibration_bins"][key],
                                 rtol=0, atol=roundoff.STEP_RTOL * counts.max())

  # Every test example exactly once, in order: the per-example stats line up with ours.
  images, labels = exp1.test_source.images, exp1.test_source.labels
  assert len(images) == 10000
  for stats in (s1, s4, s96):
    assert all(len(v) == 10000 for v in stats.values())

  apply = jax.jit(lambda variables, x: exp1.eval_model.apply(variables, x, train=False)["logits"])
  variables = jax.device_get(state1.variables())
  logits = np.concatenate([
      np.asarray(apply(variables, data_lib.normalize(images[i:i + 1000], exp1.info.mean,
                                                     exp1.info.std)))
      for i in range(0, len(images), 1000)]).astype(np.float64)
  predictions = np.argmax(logits, axis=-1)
  top1 = float(np.mean(predictions == labels))
  assert m1["top1"] == top1 and m96["top1"] == top1
  for stats in (s1, s4, s96):
    np.testing.assert_array_equal(stats["correct"], (predictions == labels).astype(np.float32))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    np.testing.assert_allclose(stats["nll"], -log_probs[np.arange(10000), labels],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["confidence"], np.exp(log_probs.max(-1)),
                               rtol=1e-4, atol=1e-6)
