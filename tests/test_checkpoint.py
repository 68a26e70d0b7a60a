"""Verified checkpoints: every kind of damage to the newest step falls back to an older one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax.train.checkpoint import Checkpointer, NoUsableCheckpoint

ABSTRACT = {"w": jax.ShapeDtypeStruct((256, 16), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _state(step):
  return {"w": jnp.full((256, 16), float(step)) + jnp.arange(16.0),
          "step": jnp.asarray(step, jnp.int32)}


def _saved(tmp_path, steps=(1, 2, 3), keep=3):
  lines = []
  checkpointer = Checkpointer(str(tmp_path), keep=keep, log=lines.append)
  for step in steps:
    checkpointer.save(step, _state(step))
  return checkpointer, lines


def _files(step_dir):
  return sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir)
                for name in names)


def _largest_data_file(step_dir):
  data = [f for f in _files(step_dir) if f"{os.sep}d{os.sep}" in f]
  return max(data, key=os.path.getsize)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


DAMAGE = {
    "metadata deleted": lambda d: os.remove(os.path.join(d, "default", "_METADATA")),
    "manifest deleted": lambda d: os.remove(os.path.join(d, "default", "manifest.ocdbt")),
    "data truncated": lambda d: os.truncate(_largest_data_file(d),
                                            os.path.getsize(_largest_data_file(d)) // 2),
    "data emptied": lambda d: os.truncate(_largest_data_file(d), 0),
    "one byte flipped": lambda d: _flip_byte(_largest_data_file(d)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  checkpointer, lines = _saved(tmp_path)
  DAMAGE[damage](os.path.join(checkpointer.directory, "3"))
  assert checkpointer.verify(3) is not None
  state, step = checkpointer.restore(ABSTRACT)
  assert step == 2
  np.testing.assert_array_equal(state["w"], _state(2)["w"])
  assert len(lines) == 1 and lines[0].startswith("Skipping checkpoint 3: "), lines
  checkpointer.close()


def test_an_empty_stray_folder_is_skipped_and_a_finished_unrecorded_step_restored(tmp_path):
  """A kill between Orbax's commit and the checksum record leaves a complete step without a
  record: it is restored (said so) and recorded, or a kill then would cost the only checkpoint.
  A stray empty folder has no record either, but does not restore: skipped."""
  checkpointer, lines = _saved(tmp_path)
  os.remove(os.path.join(str(tmp_path), "checkpoint_checksums", "3.json"))
  os.makedirs(os.path.join(checkpointer.directory, "20"))  # a stray empty step folder
  state, step = checkpointer.restore(ABSTRACT)
  assert step == 3 and int(state["step"]) == 3
  assert lines[0].startswith("Skipping checkpoint 20: no checksum record and restore failed")
  assert lines[1].startswith("Checkpoint 3 has no checksum record") and len(lines) == 2
  assert checkpointer.verify(3) is None  # recorded now
  # An unrecorded step that is also damaged: skipped for the previous verified one.
  os.remove(os.path.join(str(tmp_path), "checkpoint_checksums", "3.json"))
  os.remove(os.path.join(checkpointer.directory, "3", "default", "_METADATA"))
  lines.clear()
  assert checkpointer.restore(ABSTRACT)[1] == 2
  assert [line.split(":")[0] for line in lines] == ["Skipping checkpoint 20",
                                                    "Skipping checkpoint 3"]
  # Training on from step 2 reaches step 3 again: the damaged leftover is replaced.
  checkpointer.save(3, _state(3))
  assert checkpointer.verify(3) is None
  checkpointer.close()


def test_nothing_usable_is_one_line_naming_each_step(tmp_path):
  checkpointer, _ = _saved(tmp_path, steps=(1, 2), keep=2)
  for step in (1, 2):
    _flip_byte(_largest_data_file(os.path.join(checkpointer.directory, str(step))))
  with pytest.raises(NoUsableCheckpoint, match=r"no usable checkpoint .*: 2 \(.*\); 1 \(.*\)"):
    checkpointer.restore(ABSTRACT)
  checkpointer.close()


def test_keeps_the_newest_verified_steps_and_a_restore_leaves_them_valid(tmp_path):
  checkpointer, _ = _saved(tmp_path, steps=(1, 2, 3, 4), keep=2)
  assert checkpointer.steps() == [4, 3]
  assert sorted(os.listdir(os.path.join(str(tmp_path), "checkpoint_checksums"))) == [
      "3.json", "4.json"]
  for _ in range(2):  # restoring must not change what was verified
    state, step = checkpointer.restore(ABSTRACT)
    assert step == 4 and int(state["step"]) == 4
  assert checkpointer.verify(4) is None and checkpointer.verify(3) is None
  checkpointer.close()


def test_an_unverified_step_is_not_counted_among_the_kept_ones(tmp_path):
  first_run, _ = _saved(tmp_path, steps=(1, 2), keep=2)
  first_run.close()
  _flip_byte(_largest_data_file(os.path.join(first_run.directory, "2")))
  # A resumed run trusts nothing it did not verify itself.
  checkpointer = Checkpointer(str(tmp_path), keep=2)
  checkpointer.save(3, _state(3))
  # 2 is damaged, so 1 is still one of the two newest verified steps and must survive.
  assert checkpointer.steps() == [3, 2, 1]
  checkpointer.save(4, _state(4))
  assert checkpointer.steps() == [4, 3]
  checkpointer.close()


def test_keep_must_be_at_least_one(tmp_path):
  with pytest.raises(ValueError, match="keep must be >= 1"):
    Checkpointer(str(tmp_path), keep=0)


def test_a_save_reads_back_only_what_it_wrote(tmp_path, monkeypatch):
  # Steps this run recorded are not hashed again when older ones are pruned: one hash per save.
  from selfkd_jax.train import checkpoint as checkpoint_lib
  hashed = []
  original = checkpoint_lib.step_checksums
  monkeypatch.setattr(checkpoint_lib, "step_checksums",
                      lambda d, *share: hashed.append(os.path.basename(d)) or original(d, *share))
  checkpointer, _ = _saved(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
  assert hashed == ["1", "2", "3", "4", "5"]
  assert checkpointer.steps() == [5, 4]
  checkpointer.close()


def test_processes_hash_disjoint_shares_that_cover_every_file(tmp_path):
  """n processes read a checkpoint once between them (the 2-process run in
  test_multiprocess.py flips a byte that only process 1 hashes)."""
  from selfkd_jax.train import checkpoint as checkpoint_lib
  checkpointer, _ = _saved(tmp_path, steps=(1,), keep=2)
  step_dir = os.path.join(checkpointer.directory, "1")
  whole = checkpoint_lib.step_checksums(step_dir)
  assert len(whole) >= 3 and list(whole) == checkpoint_lib.step_files(step_dir)
  shares = [checkpoint_lib.step_checksums(step_dir, (i, 3)) for i in range(3)]
  assert sum(len(share) for share in shares) == len(whole)
  assert {name: value for share in shares for name, value in share.items()} == whole
  # A flipped byte is found by the share that holds its file, and only there; a wrong size or a
  # missing file by every share.
  victim = max(shares[2], key=lambda name: shares[2][name][0])  # sizes are in the checksums
  with open(os.path.join(step_dir, victim), "r+b") as f:
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 1]))
  found = [checkpointer.verify(1, (i, 3)) for i in range(3)]
  assert found[:2] == [None, None]
  assert found[2] == f"{victim} does not match its checksum (changed on disk)"
  with open(os.path.join(step_dir, victim), "ab") as f:
    f.write(b"x")
  assert all("bytes, " in checkpointer.verify(1, (i, 3)) for i in range(3))
  checkpointer.close()
