"""Grouping finished runs into methods: same config except the seed.

Two runs belong together when their `config.json` files are equal after removing the seed and
the keys that only change how a run is logged or checkpointed (they may also differ between a
run and its resumption). So two PS-KD configs with different `alpha_T` never merge. A group is
labelled by its method name plus the keys that tell it apart from the other groups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

from selfkd_jax.report.runs import ReportError, Run
from selfkd_jax.train.workdir_files import RESUMABLE_KEYS, without_added_defaults, without_keys

# The seed, and the keys a resume may change.
IGNORED_KEYS = ("seed", *RESUMABLE_KEYS)
_ABSENT = "—"


@dataclasses.dataclass
class Group:
  """Runs of one config, different seeds."""
  method: str
  config: dict[str, str]            # flattened config without IGNORED_KEYS, values as JSON
  runs: list[Run]
  label: str = ""
  distinguishing: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def seeds(self) -> list:
    return [run.seed for run in self.runs]

  def get(self, key: str, default: Any = None) -> Any:
    """A config value by dotted key, decoded from JSON."""
    return json.loads(self.config[key]) if key in self.config else default


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
  """{'a': {'b': 1}} -> {'a.b': '1'}: dotted keys, values as canonical JSON (hashable)."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = json.dumps(value, sort_keys=True)
  return flat


def _comparable(run: Run) -> dict[str, str]:
  # Keys added since older runs were written, at the value those runs had: the same run.
  config = without_keys(without_added_defaults(run.config), IGNORED_KEYS)
  teacher = config.pop("teacher", None)
  flat = flatten(config)
  if isinstance(teacher, dict):
    # A whole run config nested in the student's: one key, the config file it came from plus a
    # digest of the (possibly overridden) config, so different teachers still group apart.
    digest = hashlib.sha256(json.dumps(teacher, sort_keys=True).encode()).hexdigest()[:8]
    flat["teacher"] = json.dumps(f"{teacher.get('source') or 'config'}#{digest}")
  return flat


def group_runs(runs: Sequence[Run]) -> list[Group]:
  """Groups finished runs by config; ce first, then by method name and label.

  Raises:
    ReportError: a group holds the same seed twice (the same run reached twice, or a copy):
      counting it twice would shrink the spread.
  """
  groups: dict[tuple, Group] = {}
  for run in runs:
    config = _comparable(run)
    key = tuple(sorted(config.items()))
    group = groups.setdefault(key, Group(str(run.config["method"].get("name")), config, []))
    for other in group.runs:
      if other.seed == run.seed:
        raise ReportError(f"seed {run.seed} appears twice with the same config: {other.path} "
                          f"and {run.path}; pass only one of them")
    group.runs.append(run)
  result = list(groups.values())
  for group in result:
    group.runs.sort(key=lambda r: (not isinstance(r.seed, int),
                                   r.seed if isinstance(r.seed, int) else 0, r.path))
  _label(result)
  result.sort(key=lambda g: (g.method != "ce", g.method, g.label))
  return result


def _differing(groups: Sequence[Group]) -> set[str]:
  keys = set().union(*(g.config for g in groups)) if groups else set()
  return {k for k in keys if len({g.config.get(k, _ABSENT) for g in groups}) > 1}


def _method_scoped(key: str) -> bool:
  """Keys that describe the method: its own settings, and the teacher run it distills from."""
  return key.startswith("method.") or key == "teacher"


def _label(groups: Sequence[Group]) -> None:
  """Sets `label` and `distinguishing` on every group.

  Shown: keys outside the method that differ anywhere (e.g. `num_epochs`), and method-scoped
  keys (`method.*`, `teacher`) that differ between groups of the same method (e.g. `alpha_T`).
  A method's own keys that merely differ from another method's are not shown: `pskd` needs no
  `alpha_T=0.8` beside `ce`, and `ce` no `teacher=—` beside `kd`. A key the group lacks is left
  out of its label (the configuration section still lists it as —). `method.` is dropped from
  a name unless that would collide with another shown key (`method.teacher` beside `teacher`).
  """
  shared = {k for k in _differing(groups) if not _method_scoped(k)}
  for group in groups:
    same_method = [g for g in groups if g.method == group.method]
    own = {k for k in _differing(same_method) if _method_scoped(k)}
    keys = sorted(shared | own, key=lambda k: (k.startswith("method."), k))
    keys = [k for k in keys if k != "method.name"]
    group.distinguishing = {k: group.config.get(k, _ABSENT) for k in keys}
    short = [k.removeprefix("method.") for k in keys]
    names = {k: k if k != s and short.count(s) > 1 else s for k, s in zip(keys, short)}
    shown = ", ".join(f"{names[k]}={_plain(group.config[k])}" for k in keys if k in group.config)
    group.label = f"{group.method} ({shown})" if shown else group.method


def _plain(value: str) -> str:
  """JSON '"step"' -> 'step'; numbers and lists as written."""
  try:
    decoded = json.loads(value)
  except ValueError:
    return value
  return decoded if isinstance(decoded, str) else value


def config_differences(groups: Sequence[Group]) -> tuple[list[str], dict[str, str]]:
  """(keys whose value differs between groups, the config keys shared by all groups)."""
  differing = sorted(_differing(groups))
  common = {k: v for k, v in groups[0].config.items() if k not in differing} if groups else {}
  return differing, common
