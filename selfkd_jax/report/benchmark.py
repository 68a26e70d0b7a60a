"""Step-time records from `benchmarks/step_time.py` and the one that fits a group of runs."""

from __future__ import annotations

import json
from typing import Any

from selfkd_jax.report.runs import ReportError

_NEEDED = ("method", "model", "dtype", "ratio_to_ce")


def load(path: str) -> list[dict[str, Any]]:
  """The records of a benchmark results file (a JSON list). ReportError if unusable."""
  try:
    with open(path) as f:
      records = json.load(f)
  except OSError as error:
    raise ReportError(f"benchmark file {path}: {error.strerror}") from None
  except ValueError as error:
    raise ReportError(f"benchmark file {path} is corrupt: {error}") from None
  if not isinstance(records, list) or not all(
      isinstance(r, dict) and all(k in r for k in _NEEDED) for r in records):
    raise ReportError(f"benchmark file {path} is not a list of step_time.py records "
                      f"(each with {', '.join(_NEEDED)})")
  return records


def match(records: list[dict], *, method: str, model: str, dtype: str,
          batch_size: int | None) -> dict | None:
  """The record timing `method` on `model` in `dtype`, preferring the run's batch size.

  The benchmark times each method with its default settings, so the same record serves every
  config of a method (say two `alpha_T` values); None when nothing was timed for it.
  """
  candidates = [r for r in records
                if r["method"] == method and r["model"] == model and r["dtype"] == dtype]
  same_batch = [r for r in candidates if r.get("batch_size") == batch_size]
  chosen = same_batch or candidates
  return chosen[0] if chosen else None


def describe(record: dict) -> str:
  """'cpu, batch 128, float32': which measurement a ratio comes from."""
  return (f"{record.get('device', '?')}, batch {record.get('batch_size', '?')}, "
          f"{record['dtype']}")
