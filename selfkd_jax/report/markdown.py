"""Assembling report.md from the tables, the figure files and the runs that were left out."""

from __future__ import annotations

from typing import Sequence

from selfkd_jax.report import runs as runs_lib
from selfkd_jax.report import tables
from selfkd_jax.report.groups import Group, config_differences
from selfkd_jax.report.runs import Run

NOTES = """\
- **top-1 last**: test accuracy after the final epoch. This is the number to compare.
- **top-1 best\\***: the highest test accuracy over the evaluated epochs. *Optimistic*:
  the test set chooses the epoch, so it overstates what the method would reach on new data.
- top-5, NLL, ECE (15 equal-width bins) and AURC are those of the final epoch.
- Each cell is mean ± sample standard deviation over the `n` seeds (n − 1 in the denominator);
  no ± when n = 1. `report.csv` has the unscaled fractions at full precision.
- wall: the run's wall time, compilation and evaluation included (after a resume: the
  earlier processes up to their last evaluated epoch, then the resumed one). images/s:
  training throughput, excluding the first logging window (compilation). Both are blank for a
  group whose runs used different device counts, parallel modes or readers, and a cell
  averaged over fewer runs than `n` says `(k of n)`.
"""


def _progress(run: Run) -> str:
  history = runs_lib.eval_history(run.path)
  total = (run.config or {}).get("num_epochs", "?")
  if not history:
    return f"no epoch evaluated yet, of {total}"
  return f"evaluated up to epoch {int(history[-1]['epoch'])} of {total}"


def _config_section(groups: Sequence[Group]) -> list[str]:
  differing, common = config_differences(groups)
  lines = ["## Configurations", ""]
  if len(groups) > 1 and differing:
    lines += ["Keys whose value differs between the groups (— = the key is absent):", "",
              "| method | seeds | " + " | ".join(f"`{k}`" for k in differing) + " |",
              "|---|---|" + "---|" * len(differing)]
    for group in groups:
      values = [f"`{group.config[k]}`" if k in group.config else "—" for k in differing]
      lines.append(f"| {group.label} | {' '.join(map(str, group.seeds))} | "
                   + " | ".join(values) + " |")
    lines.append("")
  shared = ", ".join(f"`{k}={v}`" for k, v in sorted(common.items())
                     if k in ("model.name", "data.name", "num_epochs", "batch_size",
                              "model.dtype", "data.limit_train", "optimizer.name",
                              "optimizer.learning_rate", "optimizer.schedule"))
  lines += [f"Shared by every group: {shared} (and every other key not listed above; the "
            "seed and logging/checkpointing keys are ignored when grouping).", ""]
  return lines


def document(*, dataset: str, sources: Sequence[str], groups: Sequence[Group],
             rows: Sequence[dict], unfinished: Sequence[Run], unreadable: Sequence[Run],
             figures: dict[str, str | None], notes: Sequence[str],
             benchmark_path: str | None) -> str:
  """The whole report.md text."""
  finished = sum(len(g.runs) for g in groups)
  with_ratio = benchmark_path is not None
  lines = [f"# Results: {dataset}", "",
           f"{finished} finished runs in {len(groups)} groups, from "
           + ", ".join(f"`{s}`" for s in sources) + ".", "",
           "## Test results (mean ± std over seeds)", "",
           tables.results_table(rows, with_ratio), "", NOTES]
  if with_ratio:
    lines += [f"- step time × CE: the median train-step time of the method divided by CE's, "
              f"from `{benchmark_path}` (same model and compute dtype; the run's batch size "
              "when timed). It is measured with the method's default settings and leaves out "
              "per-epoch work such as evaluation or a refresh pass. Blank: not benchmarked.", ""]
  published = tables.published_table(rows)
  if published:
    lines += ["## Against the published numbers", "",
              "Groups whose recipe reproduces a paper (`config.published`): its number beside "
              "ours under the paper's protocol, its best test epoch (optimistic, see above) or "
              "its last.", "", published, ""]
  exits = tables.exits_table(rows)
  if exits:
    lines += ["## Auxiliary exits (test top-1 %, last epoch)", "",
              "Methods that train exits of their own (BYOT, LSSKD) report each exit, shallowest "
              "first, and the ensemble: the mean of the logits of every exit and the model's "
              "own classifier. The model's own top-1 is the main table's. The exits are not part "
              "of the evaluated or exported model.", "", exits, ""]
  lines += _config_section(groups)
  if unfinished:
    lines += ["## Unfinished runs", "",
              "No `results.json` yet (running, interrupted or failed); not in the tables:", ""]
    lines += [f"- `{run.path}` (seed {run.seed}; {_progress(run)})" for run in unfinished]
    lines.append("")
  if unreadable:
    lines += ["## Unreadable runs", "", "Left out of the tables:", ""]
    lines += [f"- {run.problem}" for run in unreadable]
    lines.append("")
  lines += ["## Plots", ""]
  for title, filename in figures.items():
    lines += [f"![{title}]({filename})" if filename else f"{title}: not drawn (no data).", ""]
  lines += [f"- {note}" for note in notes] + [""]
  lines += ["## Runs", "", tables.runs_table(groups), ""]
  return "\n".join(lines)
