"""Finding run directories and reading what a run wrote, with every problem named.

A run directory is one that holds `config.json` (written when a run starts). It is *finished*
when it also holds a valid `results.json` (written last), *unfinished* without one, and
*unreadable* when either file is not the JSON the trainer writes. Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

from selfkd_jax.train.workdir_files import (CHECKPOINT_DIR, CONFIG_FILE, EVAL_HISTORY_FILE,
                                            METRICS_FILE, RESULTS_FILE, TENSORBOARD_DIR)

# Folders a run writes that never hold another run: not searched (orbax checkpoints are big).
_NOT_RUNS = (CHECKPOINT_DIR, TENSORBOARD_DIR)
# results.json keys the report needs, each a finite number; the other numbers may be null.
REQUIRED_NUMBERS = ("test_top1", "test_top5", "test_nll", "test_ece", "test_aurc",
                    "best_test_top1")
OPTIONAL_NUMBERS = ("test_ece_10bins", "best_epoch", "epochs", "wall_s", "images_per_s")
BIN_KEYS = ("count", "confidence_sum", "correct_sum")


class ReportError(Exception):
  """Input the report cannot work from; the message is one line."""


@dataclasses.dataclass
class Run:
  """One run directory and what could be read from it."""
  path: str
  config: dict[str, Any] | None = None     # config.json
  results: dict[str, Any] | None = None    # results.json, None while unfinished
  problem: str | None = None               # why the run is unreadable

  @property
  def finished(self) -> bool:
    return self.problem is None and self.results is not None

  @property
  def seed(self):
    return self.config.get("seed") if self.config else None

  @property
  def dataset(self) -> str | None:
    return ((self.config or {}).get("data") or {}).get("name")


def discover(paths: Sequence[str]) -> list[str]:
  """Run directories at or below `paths`, sorted, each once (by real path).

  Raises:
    ReportError: a path does not exist.
  """
  found: dict[str, str] = {}
  for path in paths:
    if not os.path.isdir(path):
      raise ReportError(f"{path} is not a directory")
    for directory, subdirs, files in os.walk(path, followlinks=False):
      if CONFIG_FILE in files:
        found.setdefault(os.path.realpath(directory), os.path.normpath(directory))
        subdirs[:] = []  # a run holds no other run
      else:
        subdirs[:] = sorted(d for d in subdirs if d not in _NOT_RUNS)
  return sorted(found.values())


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def load_run(path: str) -> Run:
  """Reads config.json and, if present, results.json; problems go to `Run.problem`."""
  run = Run(path)
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    run.config = _read_json(config_path)
    if not isinstance(run.config, dict) or not isinstance(run.config.get("method"), dict):
      raise ValueError("not a run config (no method)")
  except (OSError, ValueError) as error:
    run.config, run.problem = None, f"{config_path} is corrupt: {_short(error)}"
    return run
  results_path = os.path.join(path, RESULTS_FILE)
  if not os.path.exists(results_path):
    return run
  try:
    run.results = _read_json(results_path)
    _check_results(run.results)
  except (OSError, ValueError) as error:
    run.results, run.problem = None, f"{results_path} is corrupt: {_short(error)}"
  return run


def _short(error: Exception) -> str:
  return " ".join(str(error).split())[:200]


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_results(results) -> None:
  if not isinstance(results, dict):
    raise ValueError("not a JSON object")
  for key in REQUIRED_NUMBERS:
    if not _is_number(results.get(key)):
      raise ValueError(f"{key}={results.get(key)!r}, expected a number")
  for key in OPTIONAL_NUMBERS:
    if results.get(key) is not None and not _is_number(results[key]):
      raise ValueError(f"{key}={results[key]!r}, expected a number or null")
  if "test_calibration_bins" in results:
    calibration_bins(results)  # raises on a malformed entry


def calibration_bins(results: dict) -> dict[str, list[float]] | None:
  """`results["test_calibration_bins"]` checked: equal-length lists of counts and sums, or None.

  The format is `selfkd_jax.metrics.calibration_bins` of the final test evaluation, as lists:
  `{'count': [...], 'confidence_sum': [...], 'correct_sum': [...]}`, equal-width bins on (0, 1].
  """
  bins = results.get("test_calibration_bins")
  if bins is None:
    return None
  if not isinstance(bins, dict) or any(not isinstance(bins.get(k), list) for k in BIN_KEYS):
    raise ValueError(f"calibration_bins needs lists {', '.join(BIN_KEYS)}")
  lengths = {len(bins[k]) for k in BIN_KEYS}
  if len(lengths) != 1 or 0 in lengths:
    raise ValueError("calibration_bins lists are empty or of different lengths")
  if not all(_is_number(v) and v >= 0 for k in BIN_KEYS for v in bins[k]):
    raise ValueError("calibration_bins holds a negative or non-numeric value")
  return {k: [float(v) for v in bins[k]] for k in BIN_KEYS}


def check_one_dataset(runs: Sequence[Run]) -> str:
  """The dataset all readable runs share. ReportError naming one run of each if they differ."""
  example: dict[str, str] = {}
  for run in runs:
    if run.config is not None:
      example.setdefault(str(run.dataset), run.path)
  if len(example) > 1:
    named = ", ".join(f"{name} (e.g. {path})" for name, path in sorted(example.items()))
    raise ReportError(f"runs of different datasets: {named}; report one dataset at a time")
  return next(iter(example), "unknown")


def eval_history(path: str) -> list[dict]:
  """The run's per-epoch test metrics (`eval_history.json`), [] if absent or unreadable."""
  try:
    history = _read_json(os.path.join(path, EVAL_HISTORY_FILE))
  except (OSError, ValueError):
    return []
  if not isinstance(history, list):
    return []
  return [e for e in history if isinstance(e, dict) and _is_number(e.get("epoch"))]


def train_metrics(path: str) -> list[dict]:
  """Logged train metrics (`metrics.jsonl`, kind 'train'), one per step, by step.

  A resumed run logs again the steps after its last checkpoint: the later line wins, as it
  belongs to the run that went on. A line cut short by a crash is skipped.
  """
  by_step: dict[int, dict] = {}
  try:
    with open(os.path.join(path, METRICS_FILE)) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("kind") == "train" and \
            _is_number(record.get("step")):
          by_step[int(record["step"])] = record
  except OSError:
    return []
  return [by_step[step] for step in sorted(by_step)]
