"""Step-time records from `benchmarks/step_time.py` and the one that fits a group of runs."""

from __future__ import annotations

import json
from typing import Any

from selfkd_jax.report import validate
from selfkd_jax.report.runs import ReportError


def load(path: str) -> list[dict[str, Any]]:
  """The usable records of a benchmark results file (a JSON list).

  A record with a missing or mistyped field (say `ratio_to_ce: "fast"`) is left out with one
  line on stderr; the others still give their groups a ratio.

  Raises:
    ReportError: the file cannot be read, is not JSON or not a list.
  """
  try:
    with open(path) as f:
      records = json.load(f)
  except OSError as error:
    raise ReportError(f"benchmark file {path}: {error.strerror}") from None
  except ValueError as error:
    raise ReportError(f"benchmark file {path} is corrupt: {validate.short(error)}") from None
  if not isinstance(records, list):
    raise ReportError(f"benchmark file {path} is not a list of step_time.py records (it is "
                      f"{validate.describe(records)})")
  return validate.good_records(records, validate.BENCHMARK_RECORD, path, "record")


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
