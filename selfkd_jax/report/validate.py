"""What the report expects of each file it reads, checked where the file is read.

Every input was written by another program (the trainer, `benchmarks/step_time.py`) and may
since have been edited, cut short or copied wrong. The report only ever reads these files, so
instead of guarding each use (a `.get` on a string, a format code on a string, `float('fast')`),
each file or record is checked once against a small schema when it is read. One that does not
match is left out with one line on stderr saying which file and what is wrong, and everything
downstream can rely on the types below.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Sequence

MAPPING, STRING, INTEGER, NUMBER = "a mapping", "a string", "an integer", "a finite number"


def is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


_IS: dict[str, Callable[[Any], bool]] = {
    MAPPING: lambda v: isinstance(v, dict),
    STRING: lambda v: isinstance(v, str),
    INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    NUMBER: is_number,
}

# (dotted key, expected kind, required). An optional key may be absent or null. A key inside a
# mapping is checked only when that mapping is there (the mapping itself comes first); `*`
# stands for every key of the mapping. Only the keys the report reads are listed.
Schema = Sequence[tuple[str, str, bool]]

CONFIG: Schema = (  # config.json: what grouping, labels and the benchmark match read
    ("method", MAPPING, True), ("method.name", STRING, True),
    ("model", MAPPING, False), ("model.name", STRING, False), ("model.dtype", STRING, False),
    ("data", MAPPING, False), ("data.name", STRING, False),
    ("seed", INTEGER, False), ("num_epochs", INTEGER, False), ("batch_size", INTEGER, False),
)
REQUIRED_NUMBERS = ("test_top1", "test_top5", "test_nll", "test_ece", "test_aurc",
                    "best_test_top1")
OPTIONAL_NUMBERS = ("test_ece_10bins", "best_epoch", "epochs", "wall_s", "images_per_s")
RESULTS: Schema = (  # results.json (test_calibration_bins: runs.calibration_bins checks it)
    *((key, NUMBER, True) for key in REQUIRED_NUMBERS),
    *((key, NUMBER, False) for key in OPTIONAL_NUMBERS),
    ("model", STRING, False),
    ("test_exit_top1", MAPPING, False), ("test_exit_top1.*", NUMBER, False),
)
# An eval_history.json entry: the plotted values are not checked, a NaN (diverged) one is a gap.
EVAL_ENTRY: Schema = (("epoch", NUMBER, True),)
# A metrics.jsonl record of kind 'train'; as above, the values may be NaN.
TRAIN_RECORD: Schema = (("step", NUMBER, True),)
BENCHMARK_RECORD: Schema = (  # a benchmarks/step_time.py record
    ("method", STRING, True), ("model", STRING, True), ("dtype", STRING, True),
    ("ratio_to_ce", NUMBER, True), ("batch_size", INTEGER, False), ("device", STRING, False),
)

_MISSING = object()


def describe(value) -> str:
  """'a str ('fast')': the JSON value's type and a short repr, for a message."""
  text = repr(value)
  text = text if len(text) <= 40 else text[:37] + "..."
  return f"a {type(value).__name__} ({text})"


def problem(record, schema: Schema) -> str | None:
  """What is wrong with `record` under `schema` (the first thing found), None if nothing."""
  if not isinstance(record, dict):
    return f"not a JSON object but {describe(record)}"
  for key, kind, required in schema:
    for name, value in _values(record, key):
      if value is _MISSING or value is None:
        if required:
          return f"{name} is {'missing' if value is _MISSING else 'null'}"
      elif not _IS[kind](value):
        return f"{name} is {describe(value)}, expected {kind}"
  return None


def _values(record: dict, dotted: str):
  """(name, value) of every value at `dotted`; _MISSING where the last key is absent."""
  *parents, last = dotted.split(".")
  found = [("", record)]
  for part in parents:  # a parent that is absent or not a mapping was reported (or allowed)
    found = [(f"{name}{part}.", value[part]) for name, value in found
             if isinstance(value.get(part), dict)]
  for name, value in found:
    if last == "*":
      yield from ((f"{name}{k}", v) for k, v in value.items())
    else:
      yield f"{name}{last}", value.get(last, _MISSING)


def good_records(records: list, schema: Schema, path: str, noun: str) -> list[dict]:
  """The records that match `schema`; the others are left out with one line naming `path`."""
  problems = [(i, problem(r, schema)) for i, r in enumerate(records)]
  bad = [(i, p) for i, p in problems if p is not None]
  if bad:
    index, first = bad[0]
    skipping(f"{len(bad)} of {len(records)} {noun}s in {path}",
             f"{noun} {index + 1}: {first}" + (" (and others)" if len(bad) > 1 else ""))
  return [r for r, (_, p) in zip(records, problems) if p is None]


# A file is read once per figure panel (and again for report.md): one line per file and build.
_said: set[str] = set()


def skipping(what: str, why: str) -> None:
  """'warning: skipping <what>: <why>' on stderr, once per build (see `reset`)."""
  line = f"warning: skipping {what}: {short(why)}"
  if line not in _said:
    _said.add(line)
    print(line, file=sys.stderr, flush=True)


def reset() -> None:
  """Forgets what was said: a later build in the same process says it again."""
  _said.clear()


def short(error) -> str:
  """An exception or message on one line, at most 200 characters."""
  return " ".join(str(error).split())[:200]
