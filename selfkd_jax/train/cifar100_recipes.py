"""The CIFAR-100 training recipes of the official codes, one function per training script.

Each function returns a whole run config (model, initialisation, augmentation, normalisation,
optimizer, schedule, epochs, batch) as the official script trains it; the files under
`configs/cifar100/` add the method and its published number. `docs/RECIPES.md` lists every
hyper-parameter with its source and each deliberate difference.

Differences shared by every recipe, all harmless and kept on purpose:
- The last partial batch of an epoch is dropped (the official loaders keep it: 391 steps of
  batch 128 per epoch there, 390 here), so every step has the same shape and one compilation.
- BatchNorm's running variance is the biased batch variance (PyTorch keeps the unbiased one,
  n/(n-1) larger with n = B·h·w per device: 1 + 1e-4 for the first stage of a ResNet).
- Weight decay is added to the gradient of every parameter (BatchNorm and biases included), as
  `torch.optim.SGD(model.parameters(), weight_decay=...)` does in all of these scripts.
"""

from __future__ import annotations

import ml_collections

from selfkd_jax.train.default_config import SMOKE, apply_smoke, base_config, parse_arg

# Normalisation constants the scripts hard-code (the dataset's own statistics are the default).
# kuangliu/pytorch-cifar's CIFAR-10 values, used for CIFAR-100 by PS-KD, CS-KD, Zipf's LS and
# the BYOT journal code.
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# Tf-KD's `data_loader.py`.
TFKD_MEAN_STD = ((0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615))
# mdistiller's `dataset/cifar100.py`, RepDistiller's and HSAKD's loaders.
MDISTILLER_MEAN_STD = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))

# The standard distillation pairs of RepDistiller/mdistiller: teacher -> student, with DKD's
# beta for the pair (mdistiller `configs/cifar100/dkd/<pair>.yaml`; 8.0 is its default).
DISTILLATION_PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", 8.0),
    "wrn40_2-wrn16_2": ("wrn40_2", "wrn16_2_nobias", 6.0),
    "resnet56-resnet20": ("resnet56", "resnet20", 2.0),
    "vgg13-vgg8": ("vgg13", "vgg8", 6.0),
}
DEFAULT_PAIR = "resnet32x4-resnet8x4"
# Top-1 (%) of RepDistiller's README "Benchmark Results on CIFAR-100" (CRD, Tian et al. 2020):
# teachers and students trained alone, and KD; DKD from mdistiller's README. mdistiller reports
# the best test epoch, averaged over 5 runs (its maintainers, issue #30).
PAIR_RESULTS = {
    "resnet32x4-resnet8x4": {"teacher": 79.42, "student": 72.50, "kd": 73.33, "dkd": 76.32},
    "wrn40_2-wrn16_2": {"teacher": 75.61, "student": 73.26, "kd": 74.92, "dkd": 76.23},
    "resnet56-resnet20": {"teacher": 72.34, "student": 69.06, "kd": 70.66, "dkd": 71.97},
    "vgg13-vgg8": {"teacher": 74.64, "student": 70.36, "kd": 72.98, "dkd": 74.68},
}
def _cifar100(model: str, init: str, mean_std=None) -> ml_collections.ConfigDict:
  config = base_config()
  config.data.name = "cifar100"
  config.data.crop_padding = 4
  config.data.flip = 1
  if mean_std is not None:
    config.data.mean, config.data.std = mean_std
  config.model.name = model
  config.model.init = init
  config.log_every_steps = 100
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "multistep"
  return config


def _sgd(config, *, epochs: int, lr: float, nesterov: bool, weight_decay: float,
         milestones: tuple[int, ...], decay: float, batch: int = 128, warmup: float = 0.0):
  """The solver of a script: SGD momentum 0.9, multistep; milestones in 0-based epochs."""
  config.num_epochs, config.batch_size = epochs, batch
  opt = config.optimizer
  opt.learning_rate, opt.nesterov, opt.weight_decay = lr, nesterov, weight_decay
  opt.milestones, opt.decay_factor, opt.warmup_epochs = milestones, decay, warmup
  return config


def pskd(arg: str | None = None) -> ml_collections.ConfigDict:
  """lgcnsai/PS-KD-Pytorch `main.py` (README command): PreAct ResNet-18 (their
  `CIFAR_ResNet18_preActBasic`, PyTorch's default init), crop (pad 4) + flip with kuangliu's
  normalisation, 300 epochs, batch 128, SGD momentum 0.9 Nesterov, lr 0.1 x0.1 at epochs 150
  and 225, weight decay 5e-4."""
  _, smoke = parse_arg(arg)
  config = _cifar100("preact_resnet18", "pytorch", CIFAR10_MEAN_STD)
  _sgd(config, epochs=300, lr=0.1, nesterov=True, weight_decay=5e-4,
       milestones=(150, 225), decay=0.1)
  return apply_smoke(config, smoke)


def cskd(arg: str | None = None) -> ml_collections.ConfigDict:
  """alinlab/cs-kd `train.py` (README command): PreAct ResNet-18 (their `CIFAR_ResNet18`, the
  same network as PS-KD's, PyTorch's default init), crop + flip with kuangliu's normalisation,
  200 epochs, batch 128 (plus 128 same-class partners), SGD momentum 0.9, lr 0.1 /10 at 50% and
  75% of training, weight decay 1e-4.

  Their loop lowers the rate after the epoch that reaches 50% (75%) has trained, so the new rate
  applies from 0-based epoch 101 (151): our milestones (101, 151) are that schedule exactly.
  """
  _, smoke = parse_arg(arg)
  config = _cifar100("preact_resnet18", "pytorch", CIFAR10_MEAN_STD)
  _sgd(config, epochs=200, lr=0.1, nesterov=False, weight_decay=1e-4,
       milestones=(101, 151), decay=0.1)
  return apply_smoke(config, smoke)


def zipf(arg: str | None = None) -> ml_collections.ConfigDict:
  """megvii-research/zipfls `pytorch_zipfls/train.py` (its README's CIFAR-100 ResNet-18
  command): CS-KD's script and network (`CIFAR_ResNet18` is PS-KD's PreAct ResNet-18, its two
  extra heads unused at `--deeplayer 1`), the same schedule with its one-epoch lag (`utils.
  adjust_learning_rate` runs after each epoch), weight decay 1e-4, crop + flip."""
  return cskd(arg)


def tfkd(arg: str | None = None) -> ml_collections.ConfigDict:
  """yuanli2333/Teacher-free-Knowledge-Distillation (`main.py`, `train_kd.py`, `data_loader.py`,
  `experiments/base_experiments/base_resnet18/params.json`): post-activation ResNet-18 (their
  `model/resnet.py`, PyTorch's default init), crop + flip + RandomRotation(15) with their
  normalisation, 200 epochs, batch 128, SGD momentum 0.9 (no Nesterov), lr 0.1 with a linear
  warm-up over epoch 0 (per step) then x0.2 at epochs 60, 120 and 160, weight decay 5e-4."""
  _, smoke = parse_arg(arg)
  config = _cifar100("resnet18", "pytorch", TFKD_MEAN_STD)
  config.data.rotation_degrees = 15.0
  _sgd(config, epochs=200, lr=0.1, nesterov=False, weight_decay=5e-4,
       milestones=(60, 120, 160), decay=0.2, warmup=1.0)
  return apply_smoke(config, smoke)


def reffakd(arg: str | None = None) -> ml_collections.ConfigDict:
  """JEKimLab/ReffAKD `cifar100/tinySLG_distillation.ipynb`: post-activation ResNet-18 (kuangliu
  style, PyTorch's default init), crop + flip + RandomRotation(15), normalised with CIFAR-100's
  own statistics (computed in the notebook; the dataset's default here), 200 epochs, batch 128,
  SGD momentum 0.9 (no Nesterov), lr 0.1 x0.2 at epochs 60, 120 and 160, weight decay 5e-4."""
  _, smoke = parse_arg(arg)
  config = _cifar100("resnet18", "pytorch")
  config.data.rotation_degrees = 15.0
  _sgd(config, epochs=200, lr=0.1, nesterov=False, weight_decay=5e-4,
       milestones=(60, 120, 160), decay=0.2)
  return apply_smoke(config, smoke)


def byot(arg: str | None = None) -> ml_collections.ConfigDict:
  """ArchipLab-LinfengZhang/pytorch-self-distillation-final `train.py` (BYOT's journal code):
  post-activation ResNet-18 (the backbone of its `resnet.py` is our 'resnet18'; Kaiming-normal
  fan-out convs), RandomCrop(32, padding 4, fill 128) + flip + AutoAugment (CIFAR-10 policy,
  fill 128) + Cutout(16) with kuangliu's normalisation, 250 epochs, batch 128, SGD momentum 0.9
  (no Nesterov), lr 0.1 /10 at epochs 83, 166 and 240, weight decay 5e-4."""
  _, smoke = parse_arg(arg)
  config = _cifar100("resnet18", "kaiming_fan_out", CIFAR10_MEAN_STD)
  config.data.crop_fill = 128
  config.data.autoaugment = "cifar10"
  config.data.cutout = 16
  _sgd(config, epochs=250, lr=0.1, nesterov=False, weight_decay=5e-4,
       milestones=(83, 166, 240), decay=0.1)
  return apply_smoke(config, smoke)


def mdistiller(model: str, smoke: bool = False) -> ml_collections.ConfigDict:
  """megvii-research/mdistiller `configs/cifar100/*.yaml` and its trainer (RepDistiller's
  `train_teacher.py`/`train_student.py` have the same solver): `model` with Kaiming-normal
  fan-out init, crop + flip with their normalisation, 240 epochs, batch 64, SGD momentum 0.9
  (no Nesterov), lr 0.05 x0.1 at epochs 150, 180 and 210 (their 1-based `epoch > stage`),
  weight decay 5e-4."""
  config = _cifar100(model, "kaiming_fan_out", MDISTILLER_MEAN_STD)
  _sgd(config, epochs=240, lr=0.05, nesterov=False, weight_decay=5e-4,
       milestones=(150, 180, 210), decay=0.1, batch=64)
  return apply_smoke(config, smoke)


def hsakd(arg: str | None = None) -> ml_collections.ConfigDict:
  """winycg/HSAKD `train_student_cifar.py` defaults (the recipe LSSKD builds on; LSSKD published
  none): crop + flip with mdistiller's normalisation, 240 epochs, batch 64, SGD momentum 0.9
  Nesterov, lr 0.05 x0.1 at epochs 150, 180 and 210, weight decay 5e-4. The network is PS-KD's
  PreAct ResNet-18 (HSAKD has none; LSSKD compares with PS-KD), Kaiming-normal fan-out like
  HSAKD's own networks."""
  _, smoke = parse_arg(arg)
  config = _cifar100("preact_resnet18", "kaiming_fan_out", MDISTILLER_MEAN_STD)
  _sgd(config, epochs=240, lr=0.05, nesterov=True, weight_decay=5e-4,
       milestones=(150, 180, 210), decay=0.1, batch=64)
  return apply_smoke(config, smoke)


def distillation_pair(arg: str | None) -> tuple[str, str, str, float, bool]:
  """`'<teacher>-<student>[,smoke]'` (default resnet32x4-resnet8x4) -> (pair, teacher model,
  student model, DKD's beta for the pair, smoke)."""
  name, smoke = parse_arg(arg, tuple(DISTILLATION_PAIRS))
  name = name or DEFAULT_PAIR
  teacher, student, beta = DISTILLATION_PAIRS[name]
  return name, teacher, student, beta, smoke


def mdistiller_teacher(teacher: str, smoke: bool) -> ml_collections.ConfigDict:
  """`config.teacher` of a distillation-benchmark student: `configs/cifar100/ce_mdistiller.py`
  trained on `teacher` by our launcher (mdistiller downloads RepDistiller's `ckpt_epoch_240`,
  the last epoch of the same recipe), shared by every student of that teacher; a smoke student
  trains a smoke teacher in its own workdir."""
  from selfkd_jax.train.default_config import teacher_config  # pylint: disable=g-import-not-at-top
  return teacher_config("configs/cifar100/ce_mdistiller.py",
                        f"{teacher},{SMOKE}" if smoke else teacher,
                        workdir="" if smoke else f"teachers/cifar100_ce_{teacher}")
