"""Tables and plots from run directories: `python -m selfkd_jax.report RUN_DIRS... --out DIR`.

`runs` finds and reads run directories, `groups` puts runs of one config together, `tables`
computes mean ± std over seeds, `plots` draws the figures, `markdown` and `build` write the
report. Nothing here imports jax, so a report takes a second or two.
"""

from selfkd_jax.report.build import build
from selfkd_jax.report.runs import ReportError

__all__ = ["build", "ReportError"]
