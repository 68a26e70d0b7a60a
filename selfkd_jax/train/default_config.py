"""The keys every config has, with their defaults. Config files start from `base_config()`."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from selfkd_jax.train.method_factory import method_defaults


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 15
  config.batch_size = 128            # global, over all devices and hosts
  config.eval_batch_size = 0         # 0 = batch_size
  config.parallel = "shard_map"      # or 'pmap': the same step body
  config.num_devices = 0             # 0 = every visible device
  config.log_every_steps = 50        # metrics are fetched from the device every k steps
  config.checkpoint_every_steps = 0  # 0 = at the end of every epoch
  config.keep_checkpoints = 2
  config.keep_best_checkpoint = False  # also keep the best test epoch's variables (teachers)
  config.eval_every_epochs = 1
  config.progress_bar = True

  config.method = ml_collections.ConfigDict()
  config.method.name = "ce"

  config.model = ml_collections.ConfigDict()
  config.model.name = "lenet5_bn"
  config.model.dtype = "float32"     # compute dtype; parameters stay float32
  config.model.init = "flax"         # 'flax', 'pytorch' or 'kaiming_fan_out' (models.INIT_SCHEMES)
  config.model.num_classes = -1      # -1 = from the dataset

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.dir = ""               # '' = the dataset's default location
  config.data.limit_train = 0        # > 0: train on the first N examples only (smoke runs)
  config.data.reader = "auto"        # 'auto' (grain for TFDS, threads for arrays), 'threads', 'grain'
  # Variable-size TFDS datasets (imagenet2012, imagenette): decoded and cropped on the host.
  config.data.image_size = 0         # their square side (required, e.g. 224); 0 for fixed-size data
  config.data.resize_size = 0        # eval: shorter side to this, then centre crop; 0 = size/0.875
  config.data.workers = -1           # grain processes decoding them; -1 = cores-1 (<= 16; 0 on 2)
  config.data.augment = True
  config.data.crop_padding = -1      # -1 = the dataset's default
  config.data.flip = -1              # -1 = the dataset's default, 0 = off, 1 = on
  config.data.crop_fill = 0          # 0..255, the crop's padding value (BYOT's journal code: 128)
  config.data.rotation_degrees = 0.0  # > 0: random rotation in [-d, d] (Tf-KD, ReffAKD: 15)
  config.data.autoaugment = "none"   # 'none' or 'cifar10' (AutoAugment policy; BYOT journal)
  config.data.cutout = 0             # > 0: Cutout square side in pixels (BYOT journal: 16)
  config.data.color_jitter = 0.0     # > 0: brightness/contrast/saturation jitter (PS-KD: 0.4)
  config.data.lighting = 0.0         # > 0: AlexNet PCA lighting noise std (PS-KD ImageNet: 0.1)
  config.data.mean = ()              # per-channel normalisation on [0, 1]; () = the dataset's
  config.data.std = ()               # () = the dataset's

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"  # 'constant', 'multistep', 'cosine'
  config.optimizer.milestones = ()      # epochs; 'multistep' only (others refuse them)
  config.optimizer.decay_factor = 0.1
  config.optimizer.warmup_epochs = 0.0
  return config


def method_config(name: str, **values) -> ml_collections.ConfigDict:
  """`config.method` for `name` with its defaults, overridden by `values`."""
  defaults = method_defaults(name)
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(f"method {name!r} has no key(s) {', '.join(unknown)}; its keys: "
                     f"{', '.join(defaults) or 'none'}")
  return ml_collections.ConfigDict({"name": name, **defaults, **values})


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file; a relative path is tried from the working directory,
  then from the repository root (so configs name each other as `configs/...py`)."""
  candidates = [path] if os.path.isabs(path) else [path, os.path.join(REPO_ROOT, path)]
  found = next((c for c in candidates if os.path.exists(c)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} not found (tried {', '.join(candidates)})")
  spec = importlib.util.spec_from_file_location(
      "selfkd_config_" + os.path.splitext(os.path.basename(found))[0], found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def teacher_config(path: str, arg: str | None = None, *, workdir: str = "",
                   checkpoint: str = "last", **overrides) -> ml_collections.ConfigDict:
  """`config.teacher` for a student: the teacher's run config, loaded from its config file.

  The whole teacher config is nested under `config.teacher.config`, so any of its keys can be
  overridden from the command line (`--config.teacher.config.num_epochs=30`). `workdir` is where
  the teacher run lives: '' = `<student workdir>/teacher`; a relative path is taken from the
  working directory, so students that name the same workdir share one teacher (trained by the
  first of them). `overrides` set top-level keys of the teacher config (e.g. `seed=1`).

  Args:
    path: the teacher's config file, e.g. 'configs/fashion_mnist/ce.py'.
    arg: its config argument (e.g. 'smoke'); the student's argument is passed on by the
      configs in this repository, so a smoke student gets a smoke teacher.
    workdir: the teacher's workdir.
    checkpoint: 'last' (the finished run's final variables) or 'best' (those of its best test
      epoch, as Tf-KD's self-teacher `best.pth.tar`; the teacher run then keeps them:
      `keep_best_checkpoint` is set in its config).
  """
  config = load_config_file(path, arg)
  for key, value in overrides.items():
    config[key] = value
  if checkpoint == "best":
    config.keep_best_checkpoint = True
  return ml_collections.ConfigDict({"config": config, "workdir": workdir, "source": path,
                                    "checkpoint": checkpoint})


def published_result(top1: float, epoch: str, source: str) -> ml_collections.ConfigDict:
  """`config.published`: the number a recipe reproduces, for the report to set ours beside it.

  Args:
    top1: the published test top-1, in percent.
    epoch: 'best' (the paper reports its best test epoch) or 'last'; the report compares it with
      our `best_test_top1` or `test_top1` accordingly.
    source: where the number is printed (paper table, repository README).

  A resumable key: it does not change the run, and correcting it does not refuse a resume.
  """
  return ml_collections.ConfigDict({"top1": float(top1), "epoch": epoch, "source": source})


def fashion_mnist_recipe(arg: str | None = None) -> ml_collections.ConfigDict:
  """LeNet-5-BN on Fashion-MNIST, the recipe shared by every method's Fashion-MNIST config.

  `arg='smoke'`: 2 epochs on 2048 examples, for a run that finishes in seconds.
  """
  config = base_config()
  config.data.name = "fashion_mnist"
  config.model.name = "lenet5_bn"
  config.num_epochs = 15
  config.batch_size = 128
  config.optimizer.learning_rate = 0.05
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  return apply_smoke(config, parse_arg(arg)[1])


SMOKE = "smoke"


def parse_arg(arg: str | None, choices=()) -> tuple[str | None, bool]:
  """A config file's argument, `'[<choice>][,smoke]'` -> (choice or None, smoke).

  Raises:
    ValueError: anything else, naming what is allowed (launch.py prints it as one line).
  """
  parts = [part for part in (arg or "").split(",") if part]
  smoke = SMOKE in parts
  rest = [part for part in parts if part != SMOKE]
  if len(rest) > 1 or parts.count(SMOKE) > 1 or (rest and rest[0] not in choices):
    allowed = (f"{', '.join([*choices, SMOKE])} (comma-separated)" if choices else SMOKE)
    raise ValueError(f"unknown config argument {arg!r}; allowed: {allowed}")
  return (rest[0] if rest else None), smoke


def apply_smoke(config: ml_collections.ConfigDict, smoke: bool) -> ml_collections.ConfigDict:
  """A smoke run: 2 epochs on the first 2048 examples (the recipe's shape, seconds of work)."""
  if smoke:
    config.num_epochs = 2
    config.data.limit_train = 2048
    config.log_every_steps = 4
  return config
