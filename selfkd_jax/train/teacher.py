"""Frozen teachers: a finished run of this library, referenced by workdir and checksum.

A student config that distils from a network carries `config.teacher`:

    config.teacher.config   the teacher's own run config (any config of this library);
    config.teacher.workdir  where that run lives ('' = `<student workdir>/teacher`);
    config.teacher.source   the config file it came from (for messages only).

`prepare_teacher` makes sure the teacher exists (training it into its workdir first when its
results are missing, saying so), loads the parameters and BatchNorm statistics of its final
checkpoint and nothing else (no optimizer or method state), and pins them: the student's workdir
gets `teacher.json` with the teacher's workdir, step and a SHA-256 of its variables. The
student's checkpoints never copy the teacher. A resumed student recomputes the checksum and
refuses a teacher that changed since the run started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from selfkd_jax import heads, models
from selfkd_jax.train.checkpoint import Checkpointer
from selfkd_jax.train.config_check import ConfigError, difference_from_saved
from selfkd_jax.train.run_log import write_json_atomic
from selfkd_jax.train.workdir_files import (BEST_CHECKPOINT_DIR, BEST_CHECKSUM_DIR, CONFIG_FILE,
                                            RESULTS_FILE, TEACHER_FILE, WorkdirError)

@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded frozen teacher: its (eval-mode) model, variables and identity."""
  model: Any
  variables: Any
  workdir: str
  step: int
  sha256: str
  config: ml_collections.ConfigDict


def teacher_workdir(config, workdir: str) -> str:
  return config.teacher.workdir or os.path.join(workdir, "teacher")


def variables_sha256(variables) -> str:
  """SHA-256 over every leaf of `variables`: its key path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    array = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _check_compatible(config, teacher_config) -> None:
  if teacher_config.data.name != config.data.name:
    raise ConfigError(f"config.teacher trains on {teacher_config.data.name!r} but the student on "
                      f"{config.data.name!r}; a teacher must share the student's dataset")


def best_checkpointer(workdir: str, log: Callable[[str], Any] = print) -> Checkpointer:
  """Where `config.keep_best_checkpoint` keeps the variables of the best test epoch (one step).

  The epoch is chosen on the test set, as the official scripts that report or distil from the
  best epoch do (Tf-KD's `best.pth.tar`, CS-KD, Zipf, mdistiller): CIFAR has no validation split.
  """
  return Checkpointer(workdir, keep=1, log=log, directory=BEST_CHECKPOINT_DIR,
                      checksum_directory=BEST_CHECKSUM_DIR)


def variables_of(state) -> dict:
  """`{'params', 'batch_stats'}` of a train state: what a best checkpoint keeps."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def load_variables(workdir: str, checkpoint: str = "last") -> tuple[dict, int]:
  """`{'params', 'batch_stats'}` of the latest verified checkpoint in `workdir` (or of its best
  epoch's, `checkpoint='best'`), and its step.

  Only the backbone's: the heads a method trained (BYOT's exits, say) are not the teacher.
  """
  checkpointer = best_checkpointer(workdir) if checkpoint == "best" else Checkpointer(workdir)
  try:
    if checkpointer.latest_step() is None:
      hint = (" (it was trained without config.keep_best_checkpoint: train it again in a new "
              "workdir)" if checkpoint == "best" else "")
      raise ConfigError(f"teacher workdir {workdir} has no checkpoint in "
                        f"{checkpointer.directory}{hint}")
    # No target: the saved tree as plain arrays; only two of its fields are used.
    saved, step = checkpointer.restore()
  finally:
    checkpointer.close()
  variables = {"params": saved["params"], "batch_stats": saved.get("batch_stats", {})}
  if heads.BACKBONE in variables["params"]:  # a run whose method trained heads: drop them
    variables = {"batch_stats": {}, **heads.backbone_variables(variables)}
  return variables, step


def load_teacher(workdir: str, num_classes: int, checkpoint: str = "last") -> Teacher:
  """The finished run in `workdir` as a frozen teacher (model from its saved config.json);
  `checkpoint='best'`: its best test epoch's variables."""
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    teacher_config = ml_collections.ConfigDict(json.load(f))
  variables, step = load_variables(workdir, checkpoint)
  model = models.model_from_config(teacher_config.model, num_classes=num_classes)
  return Teacher(model=model, variables=variables, workdir=os.path.abspath(workdir), step=step,
                 sha256=variables_sha256(variables), config=teacher_config)


def _check_finished_run_is_this_teacher(teacher_config, directory: str) -> None:
  """A finished run used as the teacher must be the run `config.teacher.config` describes: the
  student's config.json records that config, and a teacher override (more epochs, another
  model) must not be dropped silently in favour of whatever run is there."""
  difference = difference_from_saved(teacher_config, directory,
                                     "which config the teacher run was trained with")
  if difference:
    raise ConfigError(
        f"the finished teacher run in {directory} was trained with another config than "
        f"config.teacher.config (config.teacher.config.{difference}): drop the teacher "
        "overrides to distil from that run, or point --config.teacher.workdir at a new "
        "directory to train this teacher there")


def prepare_teacher(config, workdir: str, *, num_classes: int, resuming: bool,
                    train: Callable[[Any, str], Any], log: Callable[[str], Any] = print
                    ) -> Teacher:
  """Trains the teacher if its run is unfinished, loads it, and pins it in the student workdir.

  Args:
    config: the student's config (with `config.teacher`).
    workdir: the student's workdir.
    num_classes: the dataset's classes.
    resuming: whether the student resumes from a checkpoint; then the teacher must be the one
      recorded in `<workdir>/teacher.json`.
    train: `train(config, workdir)`, the trainer (a parameter to avoid an import cycle).
    log: where the "training the teacher first" line goes.

  Raises:
    ConfigError: the teacher is for another dataset, or changed since the student started.
  """
  teacher_config = config.teacher.config
  _check_compatible(config, teacher_config)
  directory = teacher_workdir(config, workdir)
  if not os.path.exists(os.path.join(directory, RESULTS_FILE)):
    if resuming:
      raise ConfigError(f"the teacher run in {directory} is unfinished or gone, but this student "
                        "resumes from checkpoints distilled from it; restore the teacher or use "
                        "a new --workdir")
    log(f"Teacher: no finished run in {directory}; training it first "
        f"({config.teacher.get('source', '') or 'config.teacher.config'})")
    train(teacher_config, directory)
    log(f"Teacher: done; now training the student in {workdir}")
  else:
    _check_finished_run_is_this_teacher(teacher_config, directory)
  which = config.teacher.get("checkpoint", "last")
  teacher = load_teacher(directory, num_classes, which)
  record_path = os.path.join(workdir, TEACHER_FILE)
  if resuming and os.path.exists(record_path):
    try:
      with open(record_path) as f:
        recorded = json.load(f)
      recorded["sha256"].encode()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise WorkdirError(f"{record_path} is unreadable ({type(e).__name__}); it pins the teacher "
                         "this run's checkpoints were distilled from: restore it or use a new "
                         "--workdir") from None
    if recorded["sha256"] != teacher.sha256:
      raise ConfigError(
          f"the teacher in {directory} changed since this run started (sha256 "
          f"{recorded['sha256'][:12]}… recorded, {teacher.sha256[:12]}… now); restore it or use "
          "a new --workdir")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(record_path, {"workdir": teacher.workdir, "step": teacher.step,
                                    "checkpoint": which,
                                    "sha256": teacher.sha256, "model": teacher.config.model.name,
                                    "source": config.teacher.get("source", "")})
  return teacher
