"""Evaluation metrics: top-1/top-5 accuracy, NLL, ECE and AURC.

Device side, `per_example_stats` reduces logits to four numbers per example. Host side, the
metrics are computed from those numbers for the *whole* split at once, so the result does not
depend on how examples were spread over devices or hosts (no averages of averages). ECE goes
through binned counts and sums (`calibration_bins`), which add up across shards exactly.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ECE_BINS = 15  # Guo et al. 2017; PS-KD's tables use 10 bins: reported as `ece_10bins`.


def per_example_stats(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per example: max softmax probability, top-1 and top-5 correctness, NLL (all float32)."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  # Rank of the label = number of classes with a strictly larger logit (ties favour the label).
  rank = jnp.sum(logits > label_logit, axis=-1)
  return {
      "confidence": jnp.exp(jnp.max(log_probs, axis=-1)),
      "correct": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
      "top5_correct": (rank < 5).astype(jnp.float32),
      "nll": nll,
  }


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
  """Counts, summed confidences and summed correctness in equal-width bins `(lo, hi]`.

  These add up across shards exactly; `expected_calibration_error` turns them into ECE.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 goes to bin 0.
  # By comparison with the edges (ceil(confidence * n) can round across an edge).
  inner_edges = np.arange(1, num_bins) / num_bins
  bins = np.searchsorted(inner_edges, confidence, side="left")
  return {
      "count": np.bincount(bins, minlength=num_bins).astype(np.float64),
      "confidence_sum": np.bincount(bins, weights=confidence, minlength=num_bins),
      "correct_sum": np.bincount(bins, weights=correct, minlength=num_bins),
  }


def expected_calibration_error(bins: Mapping[str, np.ndarray]) -> float:
  """`ECE = sum_b (n_b / N) |acc_b - conf_b|` from `calibration_bins`."""
  count = bins["count"]
  gap = np.abs(bins["correct_sum"] - bins["confidence_sum"])  # = n_b |acc_b - conf_b|
  return float(gap.sum() / max(count.sum(), 1.0))


def area_under_risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> float:
  """AURC (Geifman et al., 2019): mean selective risk over coverages 1/N, 2/N, ..., 1.

  Examples are accepted in order of decreasing confidence (stable for ties), and the risk at
  coverage k/N is the error rate among the k accepted. Multiply by 1000 for PS-KD's tables.
  """
  order = np.argsort(-np.asarray(confidence, np.float64), kind="stable")
  errors = 1.0 - np.asarray(correct, np.float64)[order]
  risks = np.cumsum(errors) / np.arange(1, len(errors) + 1)
  return float(risks.mean()) if len(risks) else float("nan")


def classification_metrics(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
  """All evaluation metrics from the concatenated `per_example_stats` of a whole split.

  Returns top1, top5 (fractions), nll (mean), ece (15 bins), ece_10bins, aurc (fractions).
  """
  confidence, correct = stats["confidence"], stats["correct"]
  mean = lambda x: float(np.mean(np.asarray(x, np.float64)))  # float32 means are inexact
  return {
      "top1": mean(correct),
      "top5": mean(stats["top5_correct"]),
      "nll": mean(stats["nll"]),
      "ece": expected_calibration_error(calibration_bins(confidence, correct, ECE_BINS)),
      "ece_10bins": expected_calibration_error(calibration_bins(confidence, correct, 10)),
      "aurc": area_under_risk_coverage(confidence, correct),
  }
