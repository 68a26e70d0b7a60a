r"""Report on finished runs: `report.md`, `report.csv`, PNG plots and TensorBoard images.

    python -m selfkd_jax.report runs/fmnist --out reports/fmnist \
        --benchmark benchmarks/results/cpu.json

RUN_DIRS are run workdirs or folders holding them at any depth (a run is a folder with
`config.json`). Runs with the same config except the seed form one row. Exit status: 0 written;
1 written, but some runs were unreadable (named on stderr and in report.md); 2 nothing could be
reported (no runs, no finished run, runs of several datasets, a benchmark file that is not a
JSON list), with one line on stderr. A bad benchmark record, eval_history.json or metrics.jsonl
is left out with one line on stderr and does not change the status.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from selfkd_jax.report.build import build
from selfkd_jax.report.runs import ReportError


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, status 2 (argparse would print the usage too)
    raise ReportError(message)


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog="python -m selfkd_jax.report",
                   description="Tables and plots (mean ± std over seeds) from run directories.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIRS",
                      help="run workdirs or folders containing them")
  parser.add_argument("--out", default=".", help="where to write report.md, report.csv, "
                      "*.png and tb/ (default: the current directory)")
  parser.add_argument("--benchmark", default=None, metavar="JSON",
                      help="benchmarks/step_time.py results, for the step-time ratio to CE")
  try:
    args = parser.parse_args(argv)
    return build(args.run_dirs, args.out, args.benchmark)
  except ReportError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2
  except OSError as error:  # e.g. --out not writable
    print(f"error: {error.filename or ''}: {error.strerror}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  sys.exit(main())
