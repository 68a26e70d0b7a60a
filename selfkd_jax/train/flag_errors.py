"""One-line messages for what goes wrong while launch.py parses `--config` and its overrides.

absl and ml_collections report these as whatever the failing call raised: a config file
without `get_config` as `module 'config_config' has no attribute 'get_config'`, a misspelled
override as `'\\'learning_rat\\'\\nDid you mean ...'` (a KeyError's repr inside an
AttributeError), an exception raised by the config's own code with its traceback. Which
override was being applied is known only to the parsing frame in the traceback, so that is
where it is read from; the message then names the file or the override, what is wrong and, for
an unknown key, the keys there are.
"""

from __future__ import annotations

import difflib
import os

from absl import flags


def message(error: BaseException, argv) -> str:
  """One line for `error`, raised while absl parsed `argv` (after `flags.Error`s, which absl
  already words well)."""
  spec = _value(argv, "config") or "configs/fashion_mnist/pskd.py (the default)"
  override, config = _override_in_progress(error)
  if override is None:
    return config_file_error(error, spec)
  return override_error(error, override, _value(argv, f"config.{override}"), config)


def _override_in_progress(error: BaseException):
  """`(path, config)` when `error` came from applying the override `--config.<path>` to the
  loaded `config`, else `(None, None)`.

  ml_collections loads the file and applies every override inside the `--config` flag's own
  parse (`_ConfigFlag._parse`), whose locals hold the config and the override at hand; absent
  those (another ml_collections version), the error reads as the config file's.
  """
  found, tb = (None, None), error.__traceback__
  while tb is not None:
    local = tb.tb_frame.f_locals
    config = local.get("config")
    if isinstance(local.get("self"), flags.Flag) and hasattr(config, "keys"):
      # One override at a time (`field_path`), or all of them at once (`overrides`, while
      # checking and creating their parents): the first that names no key is the culprit.
      paths = ([local["field_path"]] if isinstance(local.get("field_path"), str)
               else [p for p in local.get("overrides") or () if isinstance(p, str)])
      bad = [p for p in paths if _unknown_part(p, config) is not None]
      if bad or len(paths) == 1:
        found = ((bad or paths)[0], config)
    tb = tb.tb_next
  return found


def config_file_error(error: BaseException, spec: str | None) -> str:
  """The config file could not be loaded (or its `get_config` raised)."""
  file = (spec or "").partition(":")[0]
  if isinstance(error, AttributeError) and "'get_config'" in str(error):
    return (f"--config={spec}: the file defines no get_config(); a config file defines "
            "get_config() (or get_config(arg), for path:arg) returning an ml_collections "
            "ConfigDict")
  if isinstance(error, OSError) and file and not os.path.exists(file):
    return f"--config={spec}: no such file"
  return f"--config={spec}: {type(error).__name__}: {_first_line(error)}"


def override_error(error: BaseException, path: str, value: str | None, config) -> str:
  """`--config.<path>=<value>` could not be applied to `config`: for an unknown key, which
  part of the path is wrong and the keys there are."""
  shown = f"--config.{path}" + ("" if value is None else f"={value}")
  unknown = _unknown_part(path, config)
  if unknown is None:
    return f"{shown}: {_first_line(error)}"
  depth, node = unknown
  parts = path.split(".")
  parent = ".".join(["config", *parts[:depth]])
  if not hasattr(node, "keys"):
    return f"{shown}: {parent} is a value ({node!r}), not a group of keys"
  keys = sorted(node.keys())
  close = difflib.get_close_matches(parts[depth], keys, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return f"{shown}: {parent} has no key {parts[depth]!r}{hint}; its keys: {', '.join(keys)}"


def _unknown_part(path: str, config):
  """`(depth, node)` where the dotted `path` leaves `config` (the node it cannot go into), or
  None when every part of it exists."""
  node = config
  for depth, part in enumerate(path.split(".")):
    if not hasattr(node, "keys") or part not in node.keys():
      return depth, node
    node = node[part]
  return None


def _value(argv, name: str) -> str | None:
  """The value given as `--name=value` in `argv`, if any (the last one, as absl takes)."""
  values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
  return values[-1] if values else None


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__
