"""Finding run directories and reading what a run wrote, with every problem named.

A run directory is one that holds `config.json` (written when a run starts). It is *finished*
when it also holds a valid `results.json` (written last), *unfinished* without one, and
*unreadable* when either file is not the JSON the trainer writes. Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from selfkd_jax.report import validate
from selfkd_jax.report.validate import is_number
from selfkd_jax.train.workdir_files import (BEST_CHECKPOINT_DIR, CHECKPOINT_DIR, CONFIG_FILE,
                                            EVAL_HISTORY_FILE, METRICS_FILE, RESULTS_FILE,
                                            TENSORBOARD_DIR)

# Folders a run writes that never hold another run: not searched (orbax checkpoints are big).
_NOT_RUNS = (CHECKPOINT_DIR, BEST_CHECKPOINT_DIR, TENSORBOARD_DIR)
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
  with open(path) as f:  # a file that is not UTF-8 raises UnicodeDecodeError, a ValueError
    return json.load(f)


def load_run(path: str) -> Run:
  """Reads config.json and, if present, results.json; problems go to `Run.problem`."""
  run = Run(path)
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    run.config = _read_json(config_path)
    _raise_problem(run.config, validate.CONFIG)
  except (OSError, ValueError) as error:
    run.config, run.problem = None, f"{config_path} is corrupt: {validate.short(error)}"
    return run
  results_path = os.path.join(path, RESULTS_FILE)
  if not os.path.exists(results_path):
    return run
  try:
    run.results = _read_json(results_path)
    _raise_problem(run.results, validate.RESULTS)
    calibration_bins(run.results)  # raises on a malformed entry
  except (OSError, ValueError) as error:
    run.results, run.problem = None, f"{results_path} is corrupt: {validate.short(error)}"
  return run


def _raise_problem(record, schema: validate.Schema) -> None:
  found = validate.problem(record, schema)
  if found is not None:
    raise ValueError(found)


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
  if not all(is_number(v) and v >= 0 for k in BIN_KEYS for v in bins[k]):
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
  """The run's per-epoch test metrics (`eval_history.json`) with a numeric epoch each.

  [] if absent (no epoch evaluated yet). An unreadable file, or entries without an epoch, are
  left out with one line on stderr: the run's results still count, only its curves lack them.
  """
  file = os.path.join(path, EVAL_HISTORY_FILE)
  if not os.path.exists(file):
    return []
  try:
    history = _read_json(file)
  except (OSError, ValueError) as error:
    validate.skipping(file, error)
    return []
  if not isinstance(history, list):
    validate.skipping(file, f"not a list of epochs but {validate.describe(history)}")
    return []
  return validate.good_records(history, validate.EVAL_ENTRY, file, "record")


def train_metrics(path: str) -> list[dict]:
  """Logged train metrics (`metrics.jsonl`, kind 'train'), one per step, by step.

  A resumed run logs again the steps after its last checkpoint: the later line wins, as it
  belongs to the run that went on. A line cut short by a crash (and glued to the next one by a
  resume) is skipped silently; a file where no line parses, or train records without a step,
  are named on stderr.
  """
  file = os.path.join(path, METRICS_FILE)
  if not os.path.exists(file):
    return []
  try:
    with open(file) as f:
      lines = [line for line in f if line.strip()]
  except (OSError, ValueError) as error:  # ValueError: not UTF-8
    validate.skipping(file, error)
    return []
  records, first_error = [], None
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except ValueError as error:
      first_error = first_error or f"line {number}: {error}"
  if lines and not records:
    validate.skipping(file, f"no line is JSON ({first_error})")
    return []
  train = [r for r in records if isinstance(r, dict) and r.get("kind") == "train"]
  by_step: dict[int, dict] = {}
  for record in validate.good_records(train, validate.TRAIN_RECORD, file, "train record"):
    by_step[int(record["step"])] = record
  return [by_step[step] for step in sorted(by_step)]
