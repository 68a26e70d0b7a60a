"""Configuration checks that run before anything is loaded or compiled.

Each failure is a `ConfigError` whose message is one line: the key, the bad value and what is
allowed. `launch.py` prints it and exits with status 2.
"""

from __future__ import annotations

import json
import os

from selfkd_jax.data.grain_reader import READERS
from selfkd_jax.train import optim
from selfkd_jax.train.default_config import SMOKE, load_config_file
from selfkd_jax.train.method_factory import (METHOD_BUILDERS, STORAGE_DTYPES,
                                             needs_network_teacher)
from selfkd_jax.train.workdir_files import (CHECKPOINT_DIR, CONFIG_FILE, RESULTS_FILE,
                                            RESUMABLE_KEYS, checkpoint_steps,
                                            without_added_defaults, without_keys,
                                            without_resumable)

PARALLEL_MODES = ("shard_map", "pmap")
UNBOUNDED_WEIGHTS = ("dkd", "aekt")
# config.teacher.checkpoint: which of the teacher run's checkpoints distils.
TEACHER_CHECKPOINTS = ("last", "best")


class ConfigError(ValueError):
  """A bad configuration value; the message is a single line."""


def _allowed(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _check_method(method) -> None:
  from selfkd_jax.methods.pskd import REFRESH_MODES  # the method module owns its modes

  _allowed("config.method.name", method.name, METHOD_BUILDERS)
  _, own_keys = METHOD_BUILDERS[method.name]
  for key in own_keys:
    if key not in method:
      raise ConfigError(f"config.method.{key} is missing; method {method.name!r} needs "
                        f"{', '.join(own_keys)}")
  for key in method:
    if key != "name" and key not in own_keys:
      raise ConfigError(f"config.method.{key} is not a key of method {method.name!r}; its "
                        f"keys: {', '.join(own_keys) or 'none'}")
  for key, value in method.items():
    full = f"config.method.{key}"
    is_number = _is_number(value)
    # Mixing weights live in [0, 1]; DKD-style term weights (alpha 1, beta 8) do not.
    is_mixing = key.startswith("alpha") or key in ("epsilon", "beta", "tc_beta")
    if is_number and is_mixing and method.name not in UNBOUNDED_WEIGHTS:
      if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{full}={value} is outside [0, 1]")
    if is_number and ("temperature" in key or key in ("tau", "T")) and value <= 0:
      raise ConfigError(f"{full}={value} must be > 0")
  if "refresh" in method:
    _allowed("config.method.refresh", method.refresh, REFRESH_MODES)
  if "storage_dtype" in method:
    _allowed("config.method.storage_dtype", method.storage_dtype, STORAGE_DTYPES)


def check_config(config, num_devices: int) -> None:
  """Checks `config` on its own and against the device count. Raises ConfigError."""
  from selfkd_jax.data import DATASET_NAMES
  from selfkd_jax.models import COMPUTE_DTYPES, INIT_SCHEMES, MODEL_NAMES

  for key in ("seed", "num_epochs", "batch_size"):
    if key not in config:
      raise ConfigError(f"config.{key} is missing")
  if not is_int(config.seed) or config.seed < 0:
    raise ConfigError(f"config.seed={config.seed!r} must be an integer >= 0")
  if not is_int(config.num_epochs) or config.num_epochs <= 0:
    raise ConfigError(f"config.num_epochs={config.num_epochs!r} must be an integer > 0")
  eval_every = config.get("eval_every_epochs", 1)
  if not is_int(eval_every) or eval_every < 1:
    raise ConfigError(f"config.eval_every_epochs={eval_every!r} must be an integer >= 1 (the "
                      "last epoch is always evaluated)")
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ConfigError(f"config.batch_size={config.batch_size} must be a positive multiple of "
                      f"the device count ({num_devices})")
  eval_batch_size = config.get("eval_batch_size", 0)
  if eval_batch_size < 0 or eval_batch_size % num_devices:
    raise ConfigError(f"config.eval_batch_size={eval_batch_size} must be 0 (= batch_size) or a "
                      f"positive multiple of the device count ({num_devices})")
  _allowed("config.parallel", config.parallel, PARALLEL_MODES)
  _check_method(config.method)
  _check_teacher(config, num_devices)
  _check_published(config)
  _allowed("config.model.name", config.model.name, MODEL_NAMES)
  _allowed("config.model.dtype", config.model.dtype, COMPUTE_DTYPES)
  _allowed("config.model.init", config.model.get("init", "flax"), INIT_SCHEMES)
  if config.data.name not in DATASET_NAMES and not _is_tfds_name(config.data.name):
    raise ConfigError(f"config.data.name={config.data.name!r} is not a known dataset; allowed: "
                      f"{', '.join(DATASET_NAMES)} or a TFDS dataset name (e.g. cifar100)")
  _allowed("config.data.reader", config.data.get("reader", "auto"), READERS)
  _check_host_images(config.data)
  if config.data.limit_train < 0:
    raise ConfigError(f"config.data.limit_train={config.data.limit_train} must be >= 0 "
                      "(0 = the whole training set)")
  _allowed("config.optimizer.name", config.optimizer.name, optim.OPTIMIZERS)
  _allowed("config.optimizer.schedule", config.optimizer.schedule, optim.SCHEDULES)
  _check_milestones(config)
  if not config.optimizer.learning_rate > 0:  # also refuses nan
    raise ConfigError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} "
                      "must be > 0")
  if config.get("keep_checkpoints", 2) < 1:
    raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1 (a run "
                      "keeps at least its latest checkpoint)")
  _check_range("config.log_every_steps", config.get("log_every_steps", 50), 1, None, "an integer")
  _check_range("config.checkpoint_every_steps", config.get("checkpoint_every_steps", 0), 0, None,
               "an integer", "(0 = at the end of every epoch)")
  _allowed("config.data.flip", config.data.get("flip", -1), (-1, 0, 1))
  _check_optimizer_numbers(config.optimizer)


def _check_range(key: str, value, low, high, kind: str = "a number", note: str = "") -> None:
  """`value` must be `kind` ('an integer' or 'a number') in [low, high) (None: unbounded)."""
  ok = is_int(value) if kind == "an integer" else _is_number(value) and value == value
  ok = ok and (low is None or value >= low) and (high is None or value < high)
  if not ok:
    bounds = (f">= {low}" if high is None else f"in [{low}, {high})")
    raise ConfigError(f"{key}={value!r} must be {kind} {bounds}{' ' + note if note else ''}")


def _check_optimizer_numbers(optimizer) -> None:
  _check_range("config.optimizer.momentum", optimizer.get("momentum", 0.0), 0.0, 1.0)
  _check_range("config.optimizer.weight_decay", optimizer.get("weight_decay", 0.0), 0.0, None)
  _check_range("config.optimizer.warmup_epochs", optimizer.get("warmup_epochs", 0.0), 0.0, None)


MAX_WORKERS = 256


def _check_host_images(data) -> None:
  """The keys of variable-size datasets (decoded and cropped on the host); whether the
  dataset is one is checked when it is opened."""
  size, resize = data.get("image_size", 0), data.get("resize_size", 0)
  workers = data.get("workers", -1)
  if not is_int(size) or size < 0:
    raise ConfigError(f"config.data.image_size={size!r} must be an integer >= 0 (0 = a "
                      "fixed-size dataset's own size; variable-size datasets need the side of "
                      "their square images, e.g. 224)")
  if not is_int(resize) or resize < 0 or (resize and resize < size):
    raise ConfigError(f"config.data.resize_size={resize!r} must be 0 (= image_size / 0.875) or "
                      f"an integer >= config.data.image_size ({size})")
  if resize and not size:
    raise ConfigError(f"config.data.resize_size={resize} needs config.data.image_size > 0 "
                      "(both apply to variable-size datasets only)")
  if not is_int(workers) or not -1 <= workers <= MAX_WORKERS:
    raise ConfigError(f"config.data.workers={workers!r} must be -1 (auto: cores - 1, at most 16), "
                      f"0 (decode in the main process) or 1..{MAX_WORKERS} worker processes")
  if workers > 0 and data.get("reader", "auto") == "threads":
    raise ConfigError(f"config.data.workers={workers} needs config.data.reader 'auto' or "
                      "'grain' (the workers are grain's processes); use -1 or 0 with 'threads'")


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  """An int or a float, not a bool (a `True` in a config is a typo, not the number 1)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_milestones(config) -> None:
  """Multistep milestones are positive epoch numbers. A milestone past the run is allowed: it
  is never reached (a smoke version of a long recipe). Other schedules have no milestones, and
  refuse them rather than ignore them: a user who sets both expects both to act."""
  milestones = config.optimizer.milestones
  schedule = config.optimizer.schedule
  if schedule != "multistep":
    if milestones:
      raise ConfigError(f"config.optimizer.milestones={tuple(milestones)!r} has no effect with "
                        f"config.optimizer.schedule={schedule!r} (only 'multistep' has "
                        "milestones); drop them with --config.optimizer.milestones='()'")
    return
  if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (tuple, list)):
    raise ConfigError(f"config.optimizer.milestones={milestones!r} must be a list of epochs, "
                      "e.g. (150, 225)")
  for m in milestones:
    if not _is_number(m) or not m > 0:
      raise ConfigError(f"config.optimizer.milestones={tuple(milestones)!r}: {m!r} is not an "
                        "epoch number > 0")


def _check_published(config) -> None:
  published = config.get("published", None)
  if published is None:
    return
  top1, epoch = published.get("top1", None), published.get("epoch", None)
  if not _is_number(top1) or not 0 < top1 <= 100:
    raise ConfigError(f"config.published.top1={top1!r} must be a top-1 accuracy in percent, "
                      "in (0, 100]")
  _allowed("config.published.epoch", epoch, ("best", "last"))


def _check_teacher(config, num_devices: int) -> None:
  if not needs_network_teacher(config.method):
    return
  teacher = config.get("teacher", None)
  if teacher is None or "config" not in teacher or "workdir" not in teacher:
    raise ConfigError(f"method {config.method.name!r} distils from a network teacher but the "
                      "config has no config.teacher (config + workdir); add one with "
                      "default_config.teacher_config('configs/...py')")
  which = teacher.get("checkpoint", "last")
  _allowed("config.teacher.checkpoint", which, TEACHER_CHECKPOINTS)
  if which == "best" and not teacher.config.get("keep_best_checkpoint", False):
    raise ConfigError("config.teacher.checkpoint='best' needs "
                      "config.teacher.config.keep_best_checkpoint=True (the teacher run must "
                      "keep its best epoch)")
  try:
    check_config(teacher.config, num_devices)
  except ConfigError as error:
    raise ConfigError(str(error).replace("config.", "config.teacher.config.")) from None


def _is_tfds_name(name: str) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:  # a registry look-up: no TensorFlow, no disk, no network
    tfds.builder_cls(name.split(":")[0])
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


def check_against_dataset(config, info) -> None:
  """Checks the keys that depend on the dataset (class count, training set size)."""
  if config.model.num_classes > 0 and config.model.num_classes != info.num_classes:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} does not match "
                      f"dataset {info.name!r}, which has {info.num_classes} classes "
                      "(set it to that or to -1 = from the dataset)")
  if config.data.limit_train > info.num_train:
    raise ConfigError(f"config.data.limit_train={config.data.limit_train} exceeds the "
                      f"{info.num_train} training examples of {info.name!r}; use 0 for all")
  num_train = config.data.limit_train or info.num_train
  if num_train < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the training set "
                      f"({num_train} examples)")
  total_steps = config.num_epochs * (num_train // config.batch_size)
  if total_steps >= 2**31:
    raise ConfigError(f"config.num_epochs={config.num_epochs} gives {total_steps} steps; the "
                      f"step counter is int32 (at most {2**31 - 1})")
  side = min(info.image_shape[:2])
  crop = config.data.get("crop_padding", -1)
  if not is_int(crop) or not -1 <= crop <= side // 2:
    raise ConfigError(f"config.data.crop_padding={crop!r} must be -1 (the dataset's default) or "
                      f"0..{side // 2} (half the {side}-pixel image side)")
  _check_augmentation(config.data, side, info.image_shape[-1])
  _check_normalisation(config.data, info.image_shape[-1])


def _check_normalisation(data, channels: int) -> None:
  """`data.mean`/`data.std`: () for the dataset's statistics, else one value per channel."""
  for key in ("mean", "std"):
    values = tuple(data.get(key, ()))
    if not values:
      continue
    numbers = all(_is_number(v) for v in values)
    if (len(values) != channels or not numbers
        or not all((v > 0 if key == "std" else 0 <= v <= 1) for v in values)):
      allowed = "> 0" if key == "std" else "in [0, 1]"
      raise ConfigError(f"config.data.{key}={values!r} must be () (the dataset's) or "
                        f"{channels} numbers {allowed}, one per channel, on the [0, 1] scale")
  if bool(tuple(data.get("mean", ()))) != bool(tuple(data.get("std", ()))):
    raise ConfigError("config.data.mean and config.data.std go together: set both or neither")


def _check_augmentation(data, side: int, channels: int) -> None:
  """The augmentations after crop and flip (`data.augment.augment_batch`); all off by default."""
  from selfkd_jax.data.augment import AUTOAUGMENT_POLICIES
  fill = data.get("crop_fill", 0)
  if not is_int(fill) or not 0 <= fill <= 255:
    raise ConfigError(f"config.data.crop_fill={fill!r} must be an integer 0..255 (the pixel "
                      "value of the random crop's padding, all channels)")
  degrees = data.get("rotation_degrees", 0.0)
  if not _is_number(degrees) or not 0 <= degrees <= 180:
    raise ConfigError(f"config.data.rotation_degrees={degrees!r} must be a number in [0, 180] "
                      "(0 = off; the rotation angle is uniform in [-d, d] degrees)")
  policy = data.get("autoaugment", "none")
  _allowed("config.data.autoaugment", policy, AUTOAUGMENT_POLICIES)
  if policy != "none" and channels not in (1, 3):
    raise ConfigError(f"config.data.autoaugment={policy!r} needs 1- or 3-channel images, the "
                      f"dataset has {channels}; use 'none'")
  for key in ("color_jitter", "lighting"):
    value = data.get(key, 0.0)
    if not _is_number(value) or not 0 <= value <= 1:
      raise ConfigError(f"config.data.{key}={value!r} must be a number in [0, 1] (0 = off)")
    if value and channels != 3:
      raise ConfigError(f"config.data.{key}={value!r} needs RGB images, the dataset has "
                        f"{channels} channel(s); use 0")
  length = data.get("cutout", 0)
  if not is_int(length) or not 0 <= length <= side:
    raise ConfigError(f"config.data.cutout={length!r} must be an integer 0..{side} (0 = off; "
                      f"the side in pixels of the square cut out of the {side}-pixel image)")


def comparable(config_dict: dict) -> dict:
  """The keys that decide a run's result. Milestones count only for 'multistep': runs written
  before other schedules refused them carry the then-default (150, 225) unused."""
  kept = without_resumable(config_dict)
  optimizer = kept.get("optimizer")
  if isinstance(optimizer, dict) and optimizer.get("schedule") != "multistep":
    kept["optimizer"] = {k: v for k, v in optimizer.items() if k != "milestones"}
  return without_added_defaults(kept)


def check_workdir(config, workdir: str, remedy: str = "use another --workdir") -> None:
  """Refuses a workdir whose checkpoints or results were written by a different config.

  A config.json with nothing trained next to it (a run refused or stopped before its first
  checkpoint) binds nothing: the next run replaces it. `remedy` ends the messages: what the
  caller's user can do instead (the sweep has no --workdir).
  """
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)) or not _holds_a_run(workdir):
    return
  difference = difference_from_saved(config, workdir, "which config this workdir's checkpoints "
                                     f"belong to: restore it or {remedy}")
  if difference:
    raise ConfigError(f"workdir {workdir} holds checkpoints of a different config "
                      f"(config.{difference}); {remedy}")


def difference_from_saved(config, workdir: str, records: str) -> str | None:
  """The first key where `config` and the config.json of the run in `workdir` differ
  (`_first_difference`), or None when they describe the same run; an unreadable config.json
  is a ConfigError saying it records `records`."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      saved = comparable(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); it records {records}") from None
  return _first_difference(saved, _comparable_config(config), "", "saved")


def _comparable_config(config) -> dict:
  """`comparable` of a live ConfigDict, as its config.json would hold it."""
  return comparable(json.loads(config.to_json()))


# Where a recipe's inputs live, not what they are: RECIPES.md has CIFAR runs point
# config.data.dir at the prepared data, and a teacher may live in any workdir.
RECIPE_LOCATIONS = ("data.dir", "teacher.workdir")


def recipe_difference(config, spec: str) -> str | None:
  """Where `config` departs from the recipe its `config.published` number belongs to: the
  config file's own `get_config(arg)` for `spec = path[:arg]`, with `smoke` left out of the
  argument (a choice such as mdistiller's `vgg13-vgg8` picks a recipe; `smoke` shortens it),
  compared on the keys that decide a result; None when it is the recipe."""
  path, _, arg = spec.partition(":")
  recipe_arg = ",".join(part for part in arg.split(",") if part and part != SMOKE) or None
  recipe, current = (without_keys(_comparable_config(c), RECIPE_LOCATIONS)
                     for c in (load_config_file(path, recipe_arg), config))
  return _first_difference(recipe, current, "", "recipe")


def drop_published_unless_recipe(config, spec: str) -> str | None:
  """Sets `config.published` to None when the run is not the recipe it is the paper's number
  for (`:smoke`, an override, another dataset: `recipe_difference`), so that the report never
  sets such a run's number beside the paper's. Returns the line saying so, or None.

  Args:
    config: the run's config (changed in place).
    spec: the `--config` value, `path[:arg]`.
  """
  if not config.get("published"):
    return None
  path = spec.partition(":")[0]
  try:
    difference = recipe_difference(config, spec)
  except Exception as e:  # pylint: disable=broad-except  (the recipe itself does not load)
    difference = f"its get_config() raised {type(e).__name__}"
  if difference is None:
    return None
  config.published = None
  return (f"Published number not compared: this run is not the recipe of {path} "
          f"(config.{difference})")


def _first_difference(saved, current, prefix: str, was: str) -> str | None:
  """The first key where two comparable configs differ, as `key: <was> <v>, now <w>` (a
  `name` first: the method or model that changed says more than the keys that come with it),
  or None when they are equal."""
  if saved == current:
    return None
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return f"{prefix}: {was} {saved!r}, now {current!r}"
  keys = sorted(set(saved) | set(current), key=lambda k: (k != "name", k))
  for key in keys:
    if saved.get(key) != current.get(key):
      return _first_difference(saved.get(key), current.get(key),
                               f"{prefix}.{key}" if prefix else key, was)
  return None


def _holds_a_run(workdir: str) -> bool:
  """Whether `workdir` has results or at least one checkpoint step."""
  if os.path.exists(os.path.join(workdir, RESULTS_FILE)):
    return True
  return bool(checkpoint_steps(os.path.join(workdir, CHECKPOINT_DIR)))
