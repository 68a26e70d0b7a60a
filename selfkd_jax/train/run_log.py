"""What a run writes besides checkpoints: JSON-lines metrics, TensorBoard events, results.json.

Only process 0 writes. Files in the workdir:
  metrics.jsonl   one JSON object per logged train step or evaluation
  eval_history.json  evaluations so far (kept consistent with the checkpoint on resume)
  tb/             TensorBoard event files
  results.json    the final summary, written last (its presence marks a finished run)
"""

from __future__ import annotations

import json
import os

import jax

from selfkd_jax.files import replaced_atomically
from selfkd_jax.train.workdir_files import (EVAL_HISTORY_FILE, METRICS_FILE, RESULTS_FILE,
                                            TENSORBOARD_DIR, WorkdirError)


def write_json_atomic(path: str, payload) -> None:
  """Writes JSON through a temporary file and a rename, so readers never see half a file."""
  with replaced_atomically(path) as f:
    json.dump(payload, f, indent=1, sort_keys=True)


class RunLog:

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._metrics_file = None
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._metrics_file = open(os.path.join(workdir, METRICS_FILE), "a")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
      except ImportError:  # TensorBoard is optional; the JSON lines hold the same numbers
        self._tensorboard = None

  def write(self, kind: str, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}}
    self._metrics_file.write(json.dumps(record) + "\n")
    self._metrics_file.flush()
    if self._tensorboard is not None:
      for name, value in _scalars(values):
        self._tensorboard.add_scalar(f"{kind}/{name}", value, int(step))

  def read_eval_history(self, up_to_epoch: int) -> list[dict]:
    """Evaluations of epochs `<= up_to_epoch` (later ones belong to work lost in a crash)."""
    path = os.path.join(self.workdir, EVAL_HISTORY_FILE)
    if not os.path.exists(path):
      return []
    try:
      with open(path) as f:
        return [e for e in json.load(f) if e["epoch"] <= up_to_epoch]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WorkdirError(f"{path} is unreadable ({type(e).__name__}: {e}); it holds the test "
                         "metrics of the epochs trained so far: restore it, or move the workdir "
                         "away to start over") from None

  def write_eval_history(self, history: list[dict]) -> None:
    if self.enabled:
      write_json_atomic(os.path.join(self.workdir, EVAL_HISTORY_FILE), history)

  def write_results(self, results: dict) -> None:
    if self.enabled:
      write_json_atomic(os.path.join(self.workdir, RESULTS_FILE), results)

  def close(self) -> None:
    if self._metrics_file is not None:
      self._metrics_file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalars(values: dict):
  """(name, number) pairs; a dict of numbers (e.g. each exit's top-1) gives `name/key`."""
  for name, value in values.items():
    if _is_number(value):
      yield name, value
    elif isinstance(value, dict):
      yield from ((f"{name}/{k}", v) for k, v in value.items() if _is_number(v))


def _plain(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
