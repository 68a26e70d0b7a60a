"""Training and test curves of a group: the runs' series put on one x grid, mean and range.

Seeds of one config log at the same steps, except when `log_every_steps` differs (it may change
on resume) or a run is unfinished; then the series are interpolated onto the union of their x
values inside the range every run covers, so the mean never mixes in missing points.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from selfkd_jax.report import runs as runs_lib

# (panel title, source, key, x label): 'train' reads metrics.jsonl, 'eval' eval_history.json.
PANELS = (
    ("train loss (each method's own objective)", "train", "loss", "step"),
    ("train accuracy (augmented batches)", "train", "accuracy", "step"),
    ("test top-1", "eval", "top1", "epoch"),
    ("test NLL", "eval", "nll", "epoch"),
    ("test ECE (15 bins)", "eval", "ece", "epoch"),
    ("test AURC", "eval", "aurc", "epoch"),
)


class Band(NamedTuple):
  x: np.ndarray
  mean: np.ndarray
  low: np.ndarray    # min over seeds
  high: np.ndarray   # max over seeds
  n: int             # seeds that contributed


def run_series(path: str, source: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(x, y) of one run, or None when it logged no such value."""
  if source == "train":
    records, x_key = runs_lib.train_metrics(path), "step"
  else:
    records, x_key = runs_lib.eval_history(path), "epoch"
  points = [(float(r[x_key]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
  if not points:
    return None
  x, y = np.array(sorted(points)).T
  return x, y


def band(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> Band | None:
  """Mean, min and max over runs at common x; None when the runs share no x range."""
  series = [s for s in series if s is not None and len(s[0])]
  if not series:
    return None
  if all(np.array_equal(series[0][0], x) for x, _ in series):
    grid = series[0][0]
    ys = np.stack([y for _, y in series])
  else:
    start = max(x[0] for x, _ in series)
    stop = min(x[-1] for x, _ in series)
    grid = np.unique(np.concatenate([x for x, _ in series]))
    grid = grid[(grid >= start) & (grid <= stop)]
    if not len(grid):
      return None
    ys = np.stack([np.interp(grid, x, y) for x, y in series])
  return Band(grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0), len(series))
