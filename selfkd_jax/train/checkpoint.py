"""Orbax checkpoints of the whole train state under `<workdir>/checkpoints`.

The saved pytree is the global-layout `TrainState`: parameters, BatchNorm statistics, optimizer
state, method state (past predictions included, saved shard by shard), the step (which fixes the
data position) and the RNG. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact and never a half-written
one that restore would pick up.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from selfkd_jax.train.workdir_files import CHECKPOINT_DIR


class Checkpointer:
  """Save/restore of the train state, synchronous so a save is complete when `save` returns."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: the latest) into the shapes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    self._manager.close()
