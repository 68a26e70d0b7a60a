"""From run directories to report.md, report.csv, PNG figures and TensorBoard images."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from selfkd_jax.report import benchmark as benchmark_lib
from selfkd_jax.report import markdown, plots, tables, validate
from selfkd_jax.report import runs as runs_lib
from selfkd_jax.report.groups import group_runs
from selfkd_jax.report.runs import ReportError

CALIBRATION_NOTE = (
    "no reliability diagram for {label}: its results.json files have no `test_calibration_bins` "
    "(per-bin count, confidence sum and correct sum of the final test evaluation)")


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _write_tensorboard(directory: str, figures: dict) -> str | None:
  """Writes each figure as an image at step 0; returns a note if TensorBoard is unavailable."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "tensorboardX is not installed: no TensorBoard images written"
  writer = SummaryWriter(directory)
  try:
    for name, figure in figures.items():
      writer.add_image(f"report/{name}", plots.rgb_image(figure), 0, dataformats="HWC")
  finally:
    writer.close()
  return None


def build(run_dirs: Sequence[str], out: str, benchmark_path: str | None = None) -> int:
  """Writes the report for the runs under `run_dirs` into `out`; returns the exit status.

  0: written. 1: written, but some runs were unreadable (named on stderr and in report.md).
  A bad benchmark record, eval_history.json or metrics.jsonl only costs a ratio or a curve: it
  is named on stderr (`validate.skipping`) and does not change the status.

  Raises:
    ReportError: nothing can be reported (no runs, no finished run, runs of several datasets,
      a seed twice in one group, an unusable benchmark file, `out` is a run directory).
  """
  validate.reset()
  if os.path.exists(os.path.join(out, runs_lib.CONFIG_FILE)):
    raise ReportError(f"--out {out} is a run directory; write the report elsewhere")
  records = benchmark_lib.load(benchmark_path) if benchmark_path else None
  paths = runs_lib.discover(run_dirs)
  if not paths:
    raise ReportError(f"no runs (directories with {runs_lib.CONFIG_FILE}) under "
                      + ", ".join(run_dirs))
  runs = [runs_lib.load_run(p) for p in paths]
  dataset = runs_lib.check_one_dataset(runs)
  finished = [r for r in runs if r.finished]
  unfinished = [r for r in runs if r.problem is None and r.results is None]
  unreadable = [r for r in runs if r.problem is not None]
  for run in unreadable:
    _warn(f"error: {run.problem}")
  for run in unfinished:
    _warn(f"warning: unfinished run (no {runs_lib.RESULTS_FILE}), left out: {run.path}")
  if not finished:
    raise ReportError(f"no finished runs under {', '.join(run_dirs)} ({len(unfinished)} "
                      f"unfinished, {len(unreadable)} unreadable)")

  groups = group_runs(finished)
  rows = [tables.summarize(g, records) for g in groups]
  os.makedirs(out, exist_ok=True)
  tables.write_csv(rows, os.path.join(out, "report.csv"))

  notes = []
  drawn = {"curves": plots.curves_figure(groups),
           "reliability": plots.reliability_figure(groups)}
  for group in groups:
    bins, seeds = plots.pooled_bins(group)
    if bins is None:
      notes.append(CALIBRATION_NOTE.format(label=group.label))
    elif seeds < len(group.runs):
      notes.append(f"the reliability diagram of {group.label} pools {seeds} of "
                   f"{len(group.runs)} seeds: the others have no (or differently binned) "
                   "`test_calibration_bins`")
  if records is not None:
    drawn["accuracy_vs_step_time"] = plots.tradeoff_figure(rows, os.path.basename(benchmark_path))
    if drawn["accuracy_vs_step_time"] is None:
      notes.append(f"no accuracy vs step time plot: no record in {benchmark_path} matches a "
                   "group's method, model and dtype")
  figures = {name: fig for name, fig in drawn.items() if fig is not None}
  for name, figure in figures.items():
    plots.save_png(figure, os.path.join(out, f"{name}.png"))
  tensorboard_note = _write_tensorboard(os.path.join(out, "tb"), figures)
  if tensorboard_note:
    notes.append(tensorboard_note)
  else:
    notes.append(f"the same images are in TensorBoard: `tensorboard --logdir {out}/tb`")
  titles = {"curves": "training and test curves", "reliability": "reliability diagrams",
            "accuracy_vs_step_time": "test top-1 vs train-step time"}
  text = markdown.document(
      dataset=dataset, sources=run_dirs, groups=groups, rows=rows, unfinished=unfinished,
      unreadable=unreadable,
      figures={titles[n]: (f"{n}.png" if n in figures else None) for n in drawn},
      notes=notes, benchmark_path=benchmark_path)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(text)
  print(f"report: {os.path.join(out, 'report.md')} ({sum(len(g.runs) for g in groups)} "
        f"finished runs, {len(groups)} groups; {len(unfinished)} unfinished, "
        f"{len(unreadable)} unreadable)")
  return 1 if unreadable else 0
