"""Atomic replacement of small run files: whole or old, never half, and readable as usual."""

import json
import os
import stat

import pytest

from selfkd_jax.files import replaced_atomically
from selfkd_jax.train.run_log import write_json_atomic


def test_replaced_file_has_the_mode_a_plain_open_gives(tmp_path):
  """tempfile creates owner-only files: results.json and config.json were 0600, unreadable by
  the rest of a group sharing a cluster's runs."""
  previous = os.umask(0o027)
  try:
    with open(tmp_path / "plain.json", "w") as f:
      f.write("{}")
    write_json_atomic(str(tmp_path / "results.json"), {"test_top1": 0.5})
  finally:
    os.umask(previous)
  plain = stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode)
  written = stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode)
  assert written == plain == 0o640  # rw-r----- under umask 027
  assert json.loads((tmp_path / "results.json").read_text()) == {"test_top1": 0.5}


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "results.json"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with replaced_atomically(str(path)) as f:
      f.write("half")
      raise RuntimeError("disk full, say")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
