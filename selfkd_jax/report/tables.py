"""Per-group statistics over seeds, as CSV rows and markdown tables.

Every number is mean ± sample standard deviation (n − 1 in the denominator) over the group's
seeds; the standard deviation is left blank when n = 1. `report.csv` keeps raw fractions at full
precision; `report.md` scales them the way papers print them (%, AURC × 1000).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from typing import Any, Sequence

from selfkd_jax.report import benchmark as benchmark_lib
from selfkd_jax.report.groups import Group, flatten


@dataclasses.dataclass(frozen=True)
class Metric:
  name: str            # CSV column prefix: <name>_mean, <name>_std
  key: str             # the results.json key
  header: str          # markdown column header ('' = CSV only)
  scale: float = 1.0   # markdown value = scale × raw
  digits: int = 2      # markdown decimals


METRICS = (
    Metric("top1_last", "test_top1", "top-1 last (%)", 100),
    Metric("top1_best", "best_test_top1", "top-1 best* (%)", 100),
    Metric("best_epoch", "best_epoch", ""),
    Metric("top5", "test_top5", "top-5 (%)", 100),
    Metric("nll", "test_nll", "NLL", 1, 4),
    Metric("ece", "test_ece", "ECE 15 bins (%)", 100),
    Metric("ece_10bins", "test_ece_10bins", ""),
    Metric("aurc", "test_aurc", "AURC (×1000)", 1000),
    Metric("wall_s", "wall_s", "wall (s)", 1, 0),
    Metric("images_per_s", "images_per_s", "images/s", 1, 0),
)
CSV_COLUMNS = (["group", "method", "model", "dataset", "config", "n", "seeds"]
               + [f"{m.name}_{s}" for m in METRICS for s in ("mean", "std")]
               + ["step_time_ratio_to_ce", "step_time_benchmark", "exit_top1",
                  "published_top1", "published_epoch", "published_source"])
ENSEMBLE = "ensemble"
# Time and throughput depend on the hardware a run used, not only on its config: a group whose
# runs differ in these (resumable, so not grouping) keys gets no mean for them.
TIMED_METRICS = ("wall_s", "images_per_s")
HOW_RUN_KEYS = ("num_devices", "parallel", "data.reader", "data.workers")


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  """(mean, sample std); std None for one value, both None for none."""
  values = [float(v) for v in values]
  if not values:
    return None, None
  mean = math.fsum(values) / len(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else None)


def exit_stats(group: Group) -> dict[str, tuple[float | None, float | None]]:
  """{exit name: (mean, std)} of the last-epoch test top-1 of every auxiliary exit (BYOT,
  LSSKD), shallowest first and the ensemble last; empty for methods without exits."""
  per_exit: dict[str, list[float]] = {}
  for run in group.runs:
    for name, value in (run.results.get("test_exit_top1") or {}).items():
      per_exit.setdefault(name, []).append(value)
  names = sorted(per_exit, key=lambda name: name == ENSEMBLE)  # stable: keeps exit order
  return {name: mean_std(per_exit[name]) for name in names}


def summarize(group: Group, records: list[dict] | None) -> dict[str, Any]:
  """One report row for `group`: statistics per metric, n, seeds, the matched step-time ratio."""
  first = group.runs[0]
  row: dict[str, Any] = {
      "group": group.label, "method": group.method,
      "model": first.results.get("model", group.get("model.name")),
      "dataset": first.dataset,
      "config": "; ".join(f"{k}={v}" for k, v in group.distinguishing.items()),
      "n": len(group.runs), "seeds": " ".join(str(s) for s in group.seeds),
  }
  mixed_hardware = len({_how_run(run) for run in group.runs}) > 1
  row["counted"] = {}
  for metric in METRICS:
    values = [r.results[metric.key] for r in group.runs
              if r.results.get(metric.key) is not None]
    if mixed_hardware and metric.name in TIMED_METRICS:
      values = []
    row[f"{metric.name}_mean"], row[f"{metric.name}_std"] = mean_std(values)
    row["counted"][metric.name] = len(values)
  record = None
  if records is not None:
    record = benchmark_lib.match(records, method=group.method, model=group.get("model.name"),
                                 dtype=group.get("model.dtype", "float32"),
                                 batch_size=group.get("batch_size"))
  row["step_time_ratio_to_ce"] = record["ratio_to_ce"] if record else None
  row["step_time_benchmark"] = benchmark_lib.describe(record) if record else None
  row["exit_top1"] = exit_stats(group) or None
  published = (first.config or {}).get("published") or {}
  row["published_top1"] = published.get("top1")
  row["published_epoch"] = published.get("epoch")
  row["published_source"] = published.get("source")
  return row


def _how_run(run) -> tuple:
  """The `HOW_RUN_KEYS` values of a run (device count, parallel mode, reader), as JSON."""
  flat = flatten(run.config or {})
  return tuple(flat.get(key) for key in HOW_RUN_KEYS)


def write_csv(rows: Sequence[dict], path: str) -> None:
  """Floats at full precision (repr), missing values as empty cells."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})


def _csv_value(value) -> Any:
  if value is None:
    return ""
  return json.dumps(value) if isinstance(value, dict) else value


def _cell(mean, std, scale: float, digits: int) -> str:
  if mean is None:
    return ""
  text = f"{mean * scale:.{digits}f}"
  return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _counted(cell: str, count: int | None, n: int) -> str:
  """`cell`, marked `(k of n)` when only k of the group's n runs have the value."""
  return f"{cell} ({count} of {n})" if cell and count is not None and count < n else cell


def _escape(text: str) -> str:
  return str(text).replace("|", "\\|")


def results_table(rows: Sequence[dict], with_ratio: bool) -> str:
  """The main markdown table: one line per group."""
  shown = [m for m in METRICS if m.header]
  headers = ["method", "n"] + [m.header for m in shown] + (["step time × CE"] if with_ratio
                                                            else [])
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    cells = [_escape(row["group"]), str(row["n"])]
    cells += [_counted(_cell(row[f"{m.name}_mean"], row[f"{m.name}_std"], m.scale, m.digits),
                       row.get("counted", {}).get(m.name), row["n"])
              for m in shown]
    if with_ratio:
      ratio = row["step_time_ratio_to_ce"]
      cells.append("" if ratio is None else f"{ratio:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def published_table(rows: Sequence[dict]) -> str | None:
  """Groups whose config carries the published number of its recipe (`config.published`): that
  number beside ours under the same protocol (best or last test epoch); None if no group has
  one."""
  rows = [row for row in rows if row.get("published_top1") is not None]
  if not rows:
    return None
  lines = ["| method | n | published top-1 (%) | epoch | ours, same epoch (%) | ours − published "
           "| source |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    metric = "top1_best" if row["published_epoch"] == "best" else "top1_last"
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    difference = "" if mean is None else f"{100 * mean - row['published_top1']:+.2f}"
    lines.append(f"| {_escape(row['group'])} | {row['n']} | {row['published_top1']:.2f} | "
                 f"{row['published_epoch']} | {_cell(mean, std, 100, 2)} | {difference} | "
                 f"{_escape(row.get('published_source') or '')} |")
  return "\n".join(lines)


def exits_table(rows: Sequence[dict]) -> str | None:
  """Test top-1 (%) of every auxiliary exit and of the ensemble, for groups that have exits."""
  rows = [row for row in rows if row.get("exit_top1")]
  if not rows:
    return None
  names = sorted({name for row in rows for name in row["exit_top1"]},
                 key=lambda name: (name == ENSEMBLE, len(name), name))  # exit2 before exit10
  lines = ["| method | n | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
  for row in rows:
    cells = [_escape(row["group"]), str(row["n"])]
    cells += [_cell(*row["exit_top1"].get(name, (None, None)), 100, 2) for name in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def runs_table(groups: Sequence[Group]) -> str:
  """Every finished run on its own line, to check the aggregates against."""
  lines = ["| method | seed | top-1 last (%) | top-1 best (%) (epoch) | epochs | wall (s) | run |",
           "|---|---|---|---|---|---|---|"]
  for group in groups:
    for run in group.runs:
      r = run.results
      best_epoch = r.get("best_epoch")
      wall = r.get("wall_s")
      lines.append(
          f"| {_escape(group.label)} | {run.seed} | {100 * r['test_top1']:.2f} | "
          f"{100 * r['best_test_top1']:.2f} ({'?' if best_epoch is None else best_epoch}) | "
          f"{r.get('epochs', '')} | {'' if wall is None else f'{wall:.0f}'} | "
          f"`{run.path}` |")
  return "\n".join(lines)
