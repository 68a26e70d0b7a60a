"""The report's figures, drawn on matplotlib's Agg canvas (no pyplot, no display needed).

Each function returns a `Figure` (or None when there is nothing to draw); `save_png` and
`rgb_image` turn one into a PNG file or an image array for TensorBoard.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from selfkd_jax.report import curves as curves_lib
from selfkd_jax.report import runs as runs_lib
from selfkd_jax.report.groups import Group

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
          "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def _color(index: int) -> str:
  return COLORS[index % len(COLORS)]


def _figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)  # attaches the Agg canvas: savefig and draw need no pyplot
  return figure


def save_png(figure: Figure, path: str) -> None:
  figure.savefig(path, format="png")


def rgb_image(figure: Figure) -> np.ndarray:
  """The rendered figure, [height, width, 3] uint8."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def curves_figure(groups: Sequence[Group]) -> Figure | None:
  """Train loss/accuracy per step and test metrics per epoch: a mean line and a min–max band
  over each group's seeds."""
  figure = _figure(15, 8.5)
  axes = figure.subplots(2, 3).ravel()
  drawn = False
  for ax, (title, source, key, x_label) in zip(axes, curves_lib.PANELS):
    for index, group in enumerate(groups):
      band = curves_lib.band([curves_lib.run_series(r.path, source, key) for r in group.runs])
      if band is None:
        continue
      drawn = True
      marker = "o" if len(band.x) <= 30 else None  # few points (epochs): show where they are
      ax.plot(band.x, band.mean, color=_color(index), marker=marker, markersize=3,
              label=f"{group.label} (n={band.n})")
      if band.n > 1:
        ax.fill_between(band.x, band.low, band.high, color=_color(index), alpha=0.2, lw=0)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  if not drawn:
    return None
  axes[0].legend(fontsize="small")
  figure.suptitle("mean over seeds; shaded: min–max over seeds")
  return figure


def pooled_bins(group: Group) -> tuple[dict[str, np.ndarray] | None, int]:
  """The group's calibration bins summed over the seeds that stored them, and how many did.

  Counts and sums add up exactly, so the pooled bins are those of all the seeds' test
  predictions together.
  """
  total, seeds = None, 0
  for run in group.runs:
    bins = runs_lib.calibration_bins(run.results)
    if bins is None:
      continue
    arrays = {k: np.asarray(v, np.float64) for k, v in bins.items()}
    if total is not None and len(arrays["count"]) != len(total["count"]):
      continue  # a different bin count cannot be pooled; the note says k of n seeds
    total = arrays if total is None else {k: total[k] + arrays[k] for k in total}
    seeds += 1
  return total, seeds


def reliability_figure(groups: Sequence[Group]) -> Figure | None:
  """One reliability diagram per group with stored bins: accuracy per confidence bin."""
  drawable = [(g, *pooled_bins(g)) for g in groups]
  drawable = [(g, bins, k) for g, bins, k in drawable if bins is not None]
  if not drawable:
    return None
  columns = min(3, len(drawable))
  rows = math.ceil(len(drawable) / columns)
  figure = _figure(4.2 * columns, 4.2 * rows)
  axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
  for ax, (group, bins, seeds) in zip(axes, drawable):
    count = bins["count"]
    num_bins = len(count)
    centers = (np.arange(num_bins) + 0.5) / num_bins
    filled = count > 0
    accuracy = np.divide(bins["correct_sum"], count, out=np.zeros(num_bins), where=filled)
    confidence = np.divide(bins["confidence_sum"], count, out=np.zeros(num_bins), where=filled)
    ece = np.abs(bins["correct_sum"] - bins["confidence_sum"]).sum() / max(count.sum(), 1.0)
    ax.bar(centers[filled], accuracy[filled], width=1 / num_bins, edgecolor="black",
           color="tab:blue", alpha=0.8, label="accuracy")
    ax.scatter(centers[filled], confidence[filled], color="tab:red", s=12, zorder=3,
               label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{group.label}\n{seeds} of {len(group.runs)} seeds pooled, "
                 f"pooled ECE {100 * ece:.2f}%", fontsize="medium")
  axes[0].legend(fontsize="small", loc="upper left")
  for ax in axes[len(drawable):]:
    ax.set_visible(False)
  return figure


def tradeoff_figure(rows: Sequence[dict], benchmark_name: str) -> Figure | None:
  """Test top-1 (last epoch, mean ± std) against the train-step time relative to CE."""
  points = [(i, r) for i, r in enumerate(rows) if r["step_time_ratio_to_ce"] is not None]
  if not points:
    return None
  figure = _figure(6.5, 4.5)
  ax = figure.subplots()
  for index, row in points:  # index: the group's color in every figure
    std = row["top1_last_std"]
    ax.errorbar(row["step_time_ratio_to_ce"], 100 * row["top1_last_mean"],
                yerr=None if std is None else 100 * std, fmt="o", color=_color(index),
                capsize=3, label=f"{row['group']} (n={row['n']})")
  ax.set_xlabel(f"train-step time ÷ CE ({benchmark_name})")
  ax.set_ylabel("test top-1, last epoch (%)")
  ax.grid(alpha=0.3)
  ax.margins(x=0.15, y=0.1)
  ax.legend(fontsize="small")
  return figure
