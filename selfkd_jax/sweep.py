r"""Run every (seed × config × override set) of an experiment grid, one `launch.py` each.

    python -m selfkd_jax.sweep --configs=configs/fashion_mnist/ce.py,configs/fashion_mnist/pskd.py \
        --seeds=0,1,2 --root=runs/fmnist
    python -m selfkd_jax.sweep ... --set method.alpha_T=0.5 --set method.alpha_T=0.8   # 2 sets
    python -m selfkd_jax.sweep ... --list > jobs.txt     # one command per line, for a cluster
    python -m selfkd_jax.sweep ... --dry_run             # what would run, resume or be skipped

Each run is its own process, `python launch.py --config=<spec> --workdir=<dir>
--config.seed=<k> [--config.<key>=<value> ...]`, so a crash or a leak in one run cannot take
the sweep down, and each run starts with empty device memory. The workdir is
`<root>/<stem>/seed<k>`, where `<stem>` is the config file's name without `.py` (`ce-smoke` for
`ce.py:smoke`), followed by `+<key>=<value>` for every `--set` key, e.g.
`runs/fmnist/pskd+method.alpha_T=0.5/seed1`. Values are percent-encoded where they hold
characters a directory name should not (`/`, `+`, spaces), so different configs never share a
workdir.

`--set key=value` is applied to every run. Giving the same key several times makes a grid: one
override set per value, crossed with the other keys' values.

A run whose workdir has `results.json` is skipped (after checking that the workdir's
`config.json` is the config the sweep would run); an interrupted one resumes, since `launch.py`
resumes from its workdir. A failed run does not stop the sweep: the failures are listed at the
end and the exit status is 1. Bad input (a missing config file, a bad seed list, an override key
a config does not have) is one line on stderr and exit status 2, before anything runs. SIGTERM or
Ctrl-C stops the current run with SIGTERM (it saves a checkpoint) and ends the sweep with status
143 or 130; running the same command again carries on.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.parse
import warnings
from typing import Sequence

from selfkd_jax.train.workdir_files import CHECKPOINT_DIR, RESULTS_FILE, RESUMABLE_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Characters kept as they are in a workdir name; anything else is percent-encoded.
_SAFE = "._,=-"


class SweepError(ValueError):
  """Bad sweep input; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One launch.py invocation of the sweep."""
  config: str                              # as given: `path` or `path:arg`
  seed: int
  overrides: tuple[tuple[str, str], ...]   # (key, value) pairs of this override set
  workdir: str

  def command(self) -> list[str]:
    return [sys.executable, _display_path(LAUNCH), f"--config={self.config}",
            f"--workdir={self.workdir}", f"--config.seed={self.seed}",
            *(f"--config.{key}={value}" for key, value in self.overrides)]

  def status(self) -> str:
    """'finished' (a results.json that parses), 'resume' (checkpoints, or results that do not
    parse: launch.py rebuilds them from the final checkpoint) or 'new'."""
    if _readable_results(os.path.join(self.workdir, RESULTS_FILE)):
      return "finished"
    if (os.path.isdir(os.path.join(self.workdir, CHECKPOINT_DIR))
        or os.path.exists(os.path.join(self.workdir, RESULTS_FILE))):
      return "resume"
    return "new"


def _readable_results(path: str) -> bool:
  """Whether `path` holds a run's results: a JSON object with a numeric test_top1."""
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(results, dict) and isinstance(results.get("test_top1"), (int, float))


def _display_path(path: str) -> str:
  """`path` relative to the current directory when it lies below it (shorter commands)."""
  relative = os.path.relpath(path)
  return path if relative.startswith(os.pardir) else relative


# -- parsing ---------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' or '0-4' (inclusive) or a mix -> distinct non-negative ints, in the given order."""
  seeds = []
  for part in text.split(","):
    part = part.strip()
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not match:
      raise SweepError(f"--seeds={text!r}: {part!r} is not a seed; use e.g. 0,1,2 or 0-4")
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if last < first:
      raise SweepError(f"--seeds={text!r}: the range {part!r} is empty")
    seeds.extend(range(first, last + 1))
  duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
  if duplicates:
    raise SweepError(f"--seeds={text!r} repeats seed {duplicates[0]}")
  return seeds


def parse_configs(text: str) -> list[str]:
  """Comma-separated `path[:arg]` specs whose files exist."""
  specs = [spec.strip() for spec in text.split(",") if spec.strip()]
  if not specs:
    raise SweepError("--configs is empty; give config files, e.g. configs/fashion_mnist/ce.py")
  for spec in specs:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      raise SweepError(f"config file {path!r} (from --configs) does not exist")
  if len(set(specs)) != len(specs):
    raise SweepError(f"--configs lists a config twice: {text}")
  return specs


def parse_overrides(settings: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
  """`key=value` strings -> override sets: the product over keys of each key's values.

  A key given once applies to every set; a key given k times multiplies the sets by k. Keys keep
  the order of their first appearance (it is also their order in the workdir name).
  """
  values: dict[str, list[str]] = {}
  for setting in settings:
    key, sep, value = setting.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not _KEY.match(key):
      raise SweepError(f"--set {setting!r} is not key=value (e.g. --set method.alpha_T=0.5)")
    if key == "seed":
      raise SweepError("--set seed=... is not allowed; give seeds with --seeds")
    if value in values.setdefault(key, []):
      raise SweepError(f"--set {key}={value} is given twice")
    values[key].append(value)
  keys = list(values)
  return [tuple(zip(keys, combination))
          for combination in itertools.product(*(values[k] for k in keys))]


def config_stem(spec: str) -> str:
  """'configs/fashion_mnist/ce.py' -> 'ce'; 'configs/fashion_mnist/ce.py:smoke' -> 'ce-smoke'."""
  path, _, arg = spec.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return f"{stem}-{_encode(arg)}" if arg else stem


def _encode(text: str) -> str:
  return urllib.parse.quote(text, safe=_SAFE)


def workdir_for(root: str, spec: str, seed: int, overrides) -> str:
  """`<root>/<config stem>[+key=value...]/seed<seed>`. Keys a resume may change (how a run is
  logged, checkpointed or spread over devices) do not name it: adding or dropping one, say
  `--set progress_bar=False`, finds the same runs instead of starting them all again."""
  name = config_stem(spec) + "".join(f"+{key}={_encode(value)}" for key, value in overrides
                                     if key not in RESUMABLE_KEYS)
  return os.path.join(root, name, f"seed{seed}")


def plan(configs: Sequence[str], seeds: Sequence[int], override_sets, root: str) -> list[Run]:
  """All runs, seed-major: every config has its seed-0 run before any config's seed-1 run, so
  a sweep stopped half-way already compares every method."""
  runs = [Run(spec, seed, overrides, workdir_for(root, spec, seed, overrides))
          for seed in seeds for spec in configs for overrides in override_sets]
  by_workdir: dict[str, Run] = {}
  for run in runs:
    other = by_workdir.setdefault(run.workdir, run)
    if other is not run and other.config == run.config:
      raise SweepError(f"--set values {dict(other.overrides)} and {dict(run.overrides)} differ "
                       f"only in keys a resume may change, which name no workdir: they are one "
                       f"run ({run.workdir}); sweep them into different --root folders")
    if other is not run:  # e.g. a/ce.py and b/ce.py: same stem
      raise SweepError(f"configs {other.config} and {run.config} would share the workdir "
                       f"{run.workdir}; sweep them into different --root folders")
  return runs


# -- checks against the configs themselves ----------------------------------------------------


def _parse_config(argv: list[str]):
  """Parses `argv` (--config=..., --config.k=v ...) exactly as launch.py does."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FlagValues()
  # `sys_argv`: the override flags (--config.x) are defined from the argv they will parse.
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads config files with load_module()
    warnings.simplefilter("ignore", DeprecationWarning)
    flag_values(argv)
  return holder.value


def _one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if any(line.startswith("Traceback") for line in lines):  # the error raised in the config file
    return lines[-1]
  return " ".join(lines)


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def load_config(run: Run):
  """The ml_collections config launch.py would build for `run`; SweepError on bad input."""
  argv = ["sweep", *(a for a in run.command()[2:] if not a.startswith("--workdir="))]
  try:
    base = _parse_config(argv[:2])  # the file alone first: a missing key gets a clear message
  except Exception as error:  # pylint: disable=broad-except  # whatever the config file raises
    raise SweepError(f"config {run.config}: {_one_line(error)}") from None
  for key, value in run.overrides:
    if not _has_key(base, key):
      raise SweepError(f"--set {key}={value}: config {run.config} has no key {key!r}")
  try:
    return _parse_config(argv)
  except Exception as error:  # pylint: disable=broad-except
    settings = "".join(f" --set {k}={v}" for k, v in run.overrides)
    raise SweepError(f"config {run.config}{settings}: {_one_line(error)}") from None


def check_runs(runs: Sequence[Run]) -> dict[Run, str]:
  """Builds every run's config (raising SweepError on bad input) and checks existing workdirs.

  Returns {run: one-line problem} for runs whose workdir holds a different config's run: those
  are not run and count as failures.
  """
  from selfkd_jax.train import config_check  # pylint: disable=g-import-not-at-top

  conflicts = {}
  for run in runs:
    config = load_config(run)
    try:
      config_check.check_workdir(config, run.workdir,
                                 remedy="sweep into another --root, or move that workdir away")
    except config_check.ConfigError as error:
      conflicts[run] = str(error)
  return conflicts


# -- running ---------------------------------------------------------------------------------


class _Stopper:
  """SIGINT/SIGTERM: stop the current run with SIGTERM (it checkpoints) and end the sweep."""

  def __init__(self):
    self.signum = None
    self.child = None
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGINT, signal.SIGTERM):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _run_one(run: Run, stopper: _Stopper) -> tuple[int, str]:
  """Runs `run`, echoing its output; returns (exit status, its last stderr line)."""
  # Its own session: a terminal's Ctrl-C reaches only the sweep, which then sends SIGTERM so
  # the run saves a checkpoint instead of dying mid-epoch.
  child = subprocess.Popen(run.command(), stderr=subprocess.PIPE, text=True, errors="replace",
                           start_new_session=True)
  stopper.child = child
  last_line = ""
  try:
    for line in child.stderr:  # piped to keep the error line for the summary
      sys.stderr.write(line)
      sys.stderr.flush()
      if line.strip():
        last_line = line.strip()
  finally:
    child.stderr.close()
    status = child.wait()
    stopper.child = None
  return status, last_line


def execute(runs: Sequence[Run], conflicts: dict[Run, str]) -> int:
  """Runs what is not finished; prints progress and a summary; returns the exit status."""
  failures: list[tuple[Run, str]] = [(run, problem) for run, problem in conflicts.items()]
  counts = {"skipped": 0, "done": 0}
  with _Stopper() as stopper:
    for position, run in enumerate(runs, 1):
      prefix = f"[{position}/{len(runs)}] {run.workdir}"
      if run in conflicts:
        print(f"{prefix}: not run: {conflicts[run]}", flush=True)
        continue
      status = run.status()
      if status == "finished":
        counts["skipped"] += 1
        print(f"{prefix}: finished, skipped", flush=True)
        continue
      print(f"{prefix}: {'resuming' if status == 'resume' else 'starting'}\n"
            f"  {shlex.join(run.command())}", flush=True)
      try:
        code, last_line = _run_one(run, stopper)
      except OSError as error:
        code, last_line = -1, str(error)
      if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        print(f"sweep: stopped by {name} during {run.workdir} (exit status {code}); run the "
              "same command to carry on", file=sys.stderr, flush=True)
        return 128 + stopper.signum
      if code == 0:
        counts["done"] += 1
      else:
        failures.append((run, f"exit status {code}: {last_line or 'no error output'}"))
  print(f"sweep: {len(runs)} runs: {counts['done']} ran, {counts['skipped']} already finished, "
        f"{len(failures)} failed", flush=True)
  for run, reason in failures:
    rerun = "" if run in conflicts else f"\n  rerun: {shlex.join(run.command())}"
    print(f"failed: {run.workdir}: {reason}{rerun}", file=sys.stderr, flush=True)
  return 1 if failures else 0


# -- command line ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, status 2 (argparse prints the usage too)
    raise SweepError(message)


def _arguments(argv):
  parser = _Parser(prog="python -m selfkd_jax.sweep",
                   description="Run every (config × seed × override set), one launch.py each.")
  parser.add_argument("--configs", required=True,
                      help="comma-separated config files, `path` or `path:arg`")
  parser.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-4 (default 0)")
  parser.add_argument("--root", required=True, help="workdirs go to ROOT/<stem>[+k=v...]/seed<k>")
  parser.add_argument("--set", dest="settings", action="append", default=[],
                      metavar="KEY=VALUE", help="config override for every run; repeat a key "
                      "for a grid over its values")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--dry_run", "--dry-run", action="store_true",
                    help="print each run's status and command; run nothing")
  mode.add_argument("--list", action="store_true",
                    help="print the commands of the unfinished runs, one per line")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0 ok, 1 a run failed, 2 bad input)."""
  try:
    args = _arguments(argv)
    runs = plan(parse_configs(args.configs), parse_seeds(args.seeds),
                parse_overrides(args.settings), args.root)
    conflicts = check_runs(runs)
  except SweepError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return 2
  except KeyboardInterrupt:  # while configs load: nothing has started
    return 130

  if args.list:
    for run in runs:
      if run in conflicts:
        print(f"error: not listed: {conflicts[run]}", file=sys.stderr)
      elif run.status() != "finished":
        print(shlex.join(run.command()))
    return 1 if conflicts else 0
  if args.dry_run:
    for run in runs:
      status = "conflict: " + conflicts[run] if run in conflicts else run.status()
      print(f"{status:8s}  {shlex.join(run.command())}")
    return 1 if conflicts else 0
  return execute(runs, conflicts)


if __name__ == "__main__":
  sys.exit(main())
