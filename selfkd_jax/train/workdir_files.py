"""What a run writes into its workdir, by name, and the config keys a resume may change.

Plain constants, the workdir error type and one directory listing, importing nothing but `os`,
so that tools which must not load jax (the sweep and the report) share them with the trainer
instead of keeping copies.
"""

import os

CONFIG_FILE = "config.json"          # the run's config, checked on resume
RESULTS_FILE = "results.json"        # the final summary, written last: marks a finished run
EVAL_HISTORY_FILE = "eval_history.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CHECKSUM_DIR = "checkpoint_checksums"  # <step>.json: size and SHA-256 of each checkpoint file
# config.keep_best_checkpoint: the variables of the best test epoch so far, one step kept.
BEST_CHECKPOINT_DIR = "best_checkpoint"
BEST_CHECKSUM_DIR = "best_checkpoint_checksums"
LOCK_FILE = ".lock"                  # the run's flock; records host, pid and start time
TENSORBOARD_DIR = "tb"
TEACHER_FILE = "teacher.json"        # the frozen teacher a student distils from: path + sha256
TRAIN_LABELS_FILE = "train_labels.npy"  # same-class partners (CS-KD): every training label


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """The step folders (named by their step number) in `checkpoint_dir`, newest first."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted((int(name) for name in os.listdir(checkpoint_dir)
                 if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name))),
                reverse=True)


class WorkdirError(OSError):
  """The workdir, or a file the run needs in it, cannot be used (data/environment: exit 1)."""


# Keys that may change between a run and its resumption (dotted: nested). The first four, the
# published number a recipe is compared with, and how the host reads (the reader, its worker
# processes: the batches are the same) do not change the result; the device count and the
# runner change it only by float round-off (the order of cross-device sums), and a run may
# move to another machine.
RESUMABLE_KEYS = ("progress_bar", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "num_devices", "parallel", "published", "data.reader",
                  "data.workers")


def without_resumable(config_dict: dict) -> dict:
  """`config_dict` (as in config.json) without the `RESUMABLE_KEYS` (a copy)."""
  return without_keys(config_dict, RESUMABLE_KEYS)


def without_keys(config_dict: dict, keys) -> dict:
  """`config_dict` (as in config.json) without `keys` (dotted: nested), a copy; the nested
  dicts it changes are copied too, so the caller's dict is untouched."""
  kept = dict(config_dict)
  for key in keys:
    *parents, leaf = key.split(".")
    tree = kept
    for parent in parents:
      if not isinstance(tree.get(parent), dict):
        break
      tree[parent] = dict(tree[parent])
      tree = tree[parent]
    else:
      tree.pop(leaf, None)
  return kept


# Keys added after runs were already written, with the value that reproduces those runs: a
# workdir config without the key, or with this value, is the same run (it resumes, and the
# report groups it with new runs). Values as in config.json (tuples are JSON lists).
ADDED_KEYS = {("keep_best_checkpoint",): False, ("teacher", "checkpoint"): "last",
              ("model", "init"): "flax", ("data", "crop_fill"): 0,
              ("data", "rotation_degrees"): 0.0, ("data", "autoaugment"): "none",
              ("data", "cutout"): 0, ("data", "mean"): [], ("data", "std"): [],
              ("data", "image_size"): 0, ("data", "resize_size"): 0, ("data", "workers"): -1,
              ("data", "color_jitter"): 0.0, ("data", "lighting"): 0.0}


def without_added_defaults(config_dict: dict) -> dict:
  """`config_dict` (as loaded from config.json) without the `ADDED_KEYS` that hold their
  default, at the top and in a student's nested teacher config (a copy)."""
  for path, default in ADDED_KEYS.items():
    config_dict = _without(config_dict, path, default)
    config_dict = _without(config_dict, ("teacher", "config", *path), default)
  return config_dict


def _without(tree, path: tuple[str, ...], default):
  head, *rest = path
  if not isinstance(tree, dict) or head not in tree:
    return tree
  if rest:
    return {**tree, head: _without(tree[head], tuple(rest), default)}
  if tree[head] == default:
    return {k: v for k, v in tree.items() if k != head}
  return tree
