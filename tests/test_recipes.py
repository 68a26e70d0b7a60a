"""The CIFAR-100 configs are the official training scripts' recipes (docs/RECIPES.md): every
hyper-parameter read off each config and checked against the value in the official code, every
argument of the parametrised configs validated, and `config.published` checked."""

import glob
import importlib.util
import os

import pytest

from selfkd_jax.models import get_model, variable_shapes
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train import config_check
from selfkd_jax.train.config_check import ConfigError
from selfkd_jax.train.default_config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR100 = os.path.join(REPO, "configs", "cifar100")


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location("recipe_under_test",
                                                os.path.join(CIFAR100, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def solver(config):
  opt = config.optimizer
  return (config.num_epochs, config.batch_size, opt.name, opt.learning_rate, opt.momentum,
          opt.nesterov, opt.weight_decay, opt.schedule, tuple(opt.milestones), opt.decay_factor,
          opt.warmup_epochs)


def augmentation(config):
  data = config.data
  return (data.crop_padding, data.flip, data.crop_fill, data.rotation_degrees, data.autoaugment,
          data.cutout, tuple(data.mean), tuple(data.std))


CIFAR10 = recipes.CIFAR10_MEAN_STD
PSKD_SOLVER = (300, 128, "sgd", 0.1, 0.9, True, 5e-4, "multistep", (150, 225), 0.1, 0.0)
ALINLAB_SOLVER = (200, 128, "sgd", 0.1, 0.9, False, 1e-4, "multistep", (101, 151), 0.1, 0.0)
TFKD_SOLVER = (200, 128, "sgd", 0.1, 0.9, False, 5e-4, "multistep", (60, 120, 160), 0.2, 1.0)
MDISTILLER_SOLVER = (240, 64, "sgd", 0.05, 0.9, False, 5e-4, "multistep", (150, 180, 210), 0.1,
                     0.0)
CROP_FLIP = (4, 1, 0, 0.0, "none", 0)


@pytest.mark.parametrize("name, method, published", [
    ("ce_preact_resnet18", "ce", 75.82), ("ls_preact_resnet18", "ls", 79.06),
    ("pskd_preact_resnet18", "pskd", 79.18), ("lsrkd_preact_resnet18", "lsrkd", None),
    ("mrkd_preact_resnet18", "mrkd", None), ("ras_kd_preact_resnet18", "ras_kd", None)])
def test_pskd_recipe(name, method, published):
  """lgcnsai/PS-KD-Pytorch main.py defaults and README command; methods without a recipe of
  their own reuse it."""
  config = load(name)
  assert config.method.name == method
  assert solver(config) == PSKD_SOLVER
  assert augmentation(config) == CROP_FLIP + CIFAR10
  assert (config.model.name, config.model.init) == ("preact_resnet18", "pytorch")
  assert config.model.get("kwargs", {}).get("layout", "pskd") == "pskd"
  if published is None:
    assert "published" not in config
  else:
    assert (config.published.top1, config.published.epoch) == (published, "best")
  if method == "pskd":
    assert config.method.alpha_T == 0.8


def test_alinlab_recipes_cskd_and_zipf():
  """alinlab/cs-kd train.py and zipfls pytorch_zipfls/train.py: the same script lineage, with the
  learning rate lowered after the epoch reaching 50% / 75% (from 0-based epochs 101 and 151)."""
  for name in ("cskd_preact_resnet18", "zipf_preact_resnet18"):
    config = load(name)
    assert solver(config) == ALINLAB_SOLVER, name
    assert augmentation(config) == CROP_FLIP + CIFAR10, name
    assert (config.model.name, config.model.init) == ("preact_resnet18", "pytorch"), name
  cskd = load("cskd_preact_resnet18")
  assert (cskd.method.temperature, cskd.method.weight) == (4.0, 1.0)
  zipf = load("zipf_preact_resnet18")
  assert (zipf.method.weight, zipf.method.dense, zipf.method.upsample) == (0.1, True, 2)
  assert (zipf.published.top1, zipf.published.epoch) == (77.38, "best")


def test_tfkd_recipes_rotate_and_distil_from_the_best_epoch():
  """Teacher-free-Knowledge-Distillation: data_loader.py adds RandomRotation(15); main.py loads
  the self-teacher's best.pth.tar."""
  tfkd_stats = recipes.TFKD_MEAN_STD
  for name, published in (("ce_resnet18", 75.87), ("tfkd_reg_resnet18", 77.36),
                          ("tfkd_self_resnet18", 77.10)):
    config = load(name)
    assert solver(config) == TFKD_SOLVER, name
    assert augmentation(config) == (4, 1, 0, 15.0, "none", 0) + tfkd_stats, name
    assert (config.model.name, config.model.init) == ("resnet18", "pytorch"), name
    assert (config.published.top1, config.published.epoch) == (published, "best"), name
  reg = load("tfkd_reg_resnet18").method
  assert (reg.alpha, reg.temperature, reg.multiplier, reg.correct_prob) == (0.1, 20.0, 100.0,
                                                                             0.99)
  student = load("tfkd_self_resnet18")
  assert (student.method.alpha, student.method.temperature, student.method.multiplier) == (
      0.95, 6.0, 50.0)
  assert student.teacher.checkpoint == "best"
  teacher = student.teacher.config
  assert teacher.keep_best_checkpoint and teacher.method.name == "ce"
  own = load("ce_resnet18")
  assert not own.keep_best_checkpoint  # only as a teacher
  teacher.keep_best_checkpoint = False
  assert teacher.to_dict() == own.to_dict()
  assert student.teacher.workdir == "teachers/cifar100_ce_resnet18"


def test_byot_recipe_is_the_journal_codes():
  """pytorch-self-distillation-final train.py: RandomCrop(32, 4, fill=128), flip,
  CIFAR10Policy, Cutout(16), 250 epochs, /10 at 83, 166, 240; Kaiming fan-out convs."""
  config = load("byot_resnet18")
  assert solver(config) == (250, 128, "sgd", 0.1, 0.9, False, 5e-4, "multistep", (83, 166, 240),
                            0.1, 0.0)
  assert augmentation(config) == (4, 1, 128, 0.0, "cifar10", 16) + CIFAR10
  assert (config.model.name, config.model.init) == ("resnet18", "kaiming_fan_out")
  method = config.method
  assert (method.alpha, method.temperature, method.feature_weight, method.variant,
          tuple(method.feature_exits)) == (0.3, 3.0, 0.03, "journal", (1, 2))
  assert "published" not in config


def test_reffakd_and_lsskd_recipes():
  for name in ("reffakd_resnet18", "kd_reffakd_resnet18"):
    config = load(name)
    assert solver(config) == (200, 128, "sgd", 0.1, 0.9, False, 5e-4, "multistep",
                              (60, 120, 160), 0.2, 0.0), name
    assert augmentation(config) == (4, 1, 0, 15.0, "none", 0, (), ()), name
    assert (config.model.name, config.model.init) == ("resnet18", "pytorch"), name
  lsskd = load("lsskd_preact_resnet18")
  assert solver(lsskd) == (240, 64, "sgd", 0.05, 0.9, True, 5e-4, "multistep", (150, 180, 210),
                           0.1, 0.0)
  assert augmentation(lsskd) == CROP_FLIP + recipes.MDISTILLER_MEAN_STD
  assert lsskd.method.temperature == 3.0  # HSAKD's kd_T


# mdistiller configs/cifar100/dkd/<pair>.yaml BETA, and the README's KD / DKD top-1.
PAIRS = {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", 8.0, 73.33, 76.32),
         "wrn40_2-wrn16_2": ("wrn40_2", "wrn16_2_nobias", 6.0, 74.92, 76.23),
         "resnet56-resnet20": ("resnet56", "resnet20", 2.0, 70.66, 71.97),
         "vgg13-vgg8": ("vgg13", "vgg8", 6.0, 72.98, 74.68)}


@pytest.mark.parametrize("pair", PAIRS)
def test_distillation_benchmark_pairs(pair):
  teacher_model, student_model, beta, kd_top1, dkd_top1 = PAIRS[pair]
  for method in ("kd", "dkd", "aekt"):
    for smoke in (False, True):
      config = load(f"{method}_mdistiller", pair + (",smoke" if smoke else ""))
      config_check.check_config(config, num_devices=1)
      assert config.num_epochs == (2 if smoke else 240)
      assert config.model.name == student_model
      teacher = config.teacher
      assert teacher.config.model.name == teacher_model and teacher.checkpoint == "last"
      assert teacher.workdir == ("" if smoke else f"teachers/cifar100_ce_{teacher_model}")
      assert solver(teacher.config)[2:] == MDISTILLER_SOLVER[2:]
    assert solver(config)[2:] == MDISTILLER_SOLVER[2:]
    assert augmentation(config) == CROP_FLIP + recipes.MDISTILLER_MEAN_STD
    assert config.model.init == "kaiming_fan_out" == teacher.config.model.init
    if method == "kd":
      assert (config.method.alpha, config.method.temperature) == (0.9, 4.0)
      assert config.published.top1 == kd_top1
    else:
      assert (config.method.alpha, config.method.beta, config.method.temperature,
              config.method.warmup_epochs) == (1.0, beta, 4.0, 20.0)
      assert ("published" in config) == (method == "dkd")
      if method == "dkd":
        assert (config.published.top1, config.published.epoch) == (dkd_top1, "best")
    teacher_free = load(f"{method}_reffakd_mdistiller", pair)
    config_check.check_config(teacher_free, num_devices=1)
    assert teacher_free.model.name == student_model and "teacher" not in teacher_free
    assert teacher_free.method.teacher == "reffakd"
    assert teacher_free.method.get("beta", beta) == beta


def test_ce_mdistiller_trains_every_benchmark_network_with_its_published_number():
  expected = {"resnet32x4": 79.42, "resnet8x4": 72.50, "wrn40_2": 75.61,
              "wrn16_2_nobias": 73.26, "resnet56": 72.34, "resnet20": 69.06, "vgg13": 74.64,
              "vgg8": 70.36}
  for model, top1 in expected.items():
    config = load("ce_mdistiller", model)
    config_check.check_config(config, num_devices=1)
    assert (config.model.name, config.method.name, config.published.top1) == (model, "ce", top1)
    # The network exists under that name and takes CIFAR images (abstract trace only).
    assert variable_shapes(get_model(model, num_classes=100), (32, 32, 3))["params"]
  assert load("ce_mdistiller").model.name == "resnet32x4"


@pytest.mark.parametrize("name, arg", [("dkd_mdistiller", "resnet18-resnet8x4"),
                                       ("dkd_mdistiller", "resnet32x4-resnet8x4,vgg13-vgg8"),
                                       ("ce_mdistiller", "resnet18"),
                                       ("pskd_preact_resnet18", "resnet32x4")])
def test_bad_config_arguments_name_what_is_allowed(name, arg):
  with pytest.raises(ValueError, match=f"unknown config argument '{arg}'; allowed: .*smoke"):
    load(name, arg)


def test_published_values_are_checked():
  config = load("zipf_preact_resnet18")
  config_check.check_config(config, num_devices=1)
  for key, value, message in (
      ("top1", 177.38, r"config.published.top1=177.38 must be a top-1 accuracy in percent"),
      ("top1", 0.0, r"config.published.top1=0.0 must be"),
      ("epoch", "final", "config.published.epoch='final' is not allowed; allowed: best, last")):
    bad = config.copy_and_resolve_references()
    bad.published[key] = value
    with pytest.raises(ConfigError, match=message):
      config_check.check_config(bad, num_devices=1)


def test_every_cifar100_config_names_its_recipe_in_the_recipe_table():
  with open(os.path.join(REPO, "docs", "RECIPES.md")) as f:
    table = f.read()
  for path in sorted(glob.glob(os.path.join(CIFAR100, "*.py"))):
    name = os.path.basename(path)
    assert f"`{name}`" in table or f"`{name}:<" in table, path


def _cifar_info():
  from selfkd_jax.data.info import DatasetInfo  # pylint: disable=g-import-not-at-top
  return DatasetInfo(name="cifar100", num_classes=100, image_shape=(32, 32, 3), num_train=50000,
                     num_test=10000, mean=(0.5071, 0.4865, 0.4409),
                     std=(0.2673, 0.2564, 0.2762), flip=True, crop_padding=4)


def test_a_recipe_normalises_with_its_scripts_constants():
  """data.mean/std replace the dataset's statistics in training and evaluation (both build
  on the one `Augmentation`); () keeps the dataset's."""
  from selfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  info = _cifar_info()
  pskd = load("pskd_preact_resnet18")
  config_check.check_against_dataset(pskd, info)
  augmentation = loop._augmentation(pskd.data, info)  # pylint: disable=protected-access
  assert (augmentation.mean, augmentation.std) == recipes.CIFAR10_MEAN_STD
  reffakd = load("reffakd_resnet18")
  augmentation = loop._augmentation(reffakd.data, info)  # pylint: disable=protected-access
  assert (augmentation.mean, augmentation.std) == (info.mean, info.std)
  assert augmentation.rotation_degrees == 15.0
  for mean, std, message in (
      ((0.5, 0.5), (0.2, 0.2), r"config.data.mean=\(0.5, 0.5\) must be \(\) .* or 3 numbers"),
      ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), r"config.data.std=.* 3 numbers > 0"),
      ((0.5, 0.5, 128), (0.2, 0.2, 0.2), r"config.data.mean=.* in \[0, 1\]"),
      ((0.5, 0.5, 0.5), (), "config.data.mean and config.data.std go together")):
    bad = pskd.copy_and_resolve_references()
    bad.data.mean, bad.data.std = mean, std
    with pytest.raises(ConfigError, match=message):
      config_check.check_against_dataset(bad, info)


@pytest.mark.parametrize("method, error", [("ce", 22.19), ("ls", 21.73), ("pskd", 21.41)])
def test_imagenet_recipe_is_pskd_official_pipeline(method, error):
  """PS-KD's loader/custom_dataloader.py ImageNet branch: RandomResizedCrop(224), flip,
  ColorJitter(0.4, 0.4, 0.4), Lighting(0.1), ImageNet normalisation; Resize(256) +
  CenterCrop(224) for evaluation; its ImageNet ResNet with fan-out init."""
  path = os.path.join(REPO, "configs", "imagenet", f"{method}.py")
  spec = importlib.util.spec_from_file_location("imagenet_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg, model in ((None, "resnet152"), ("resnet50", "resnet50"), ("resnet50,smoke", "resnet50")):
    config = module.get_config(arg)
    config_check.check_config(config, num_devices=1)
    data = config.data
    smoke = arg is not None and "smoke" in arg
    assert (data.name, data.image_size, data.resize_size) == (
        ("imagenet2012", 64, 73) if smoke else ("imagenet2012", 224, 256))
    assert (data.crop_padding, data.flip, data.color_jitter, data.lighting) == (0, 1, 0.4, 0.1)
    assert (tuple(data.mean), tuple(data.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (config.model.name, config.model.init, config.method.name) == (
        model, "kaiming_fan_out", method)
    assert ("published" in config) == (model == "resnet152")
  assert module.get_config().published.top1 == round(100 - error, 2)
  assert solver(module.get_config()) == (90, 256, "sgd", 0.1, 0.9, False, 1e-4, "multistep",
                                         (30, 60), 0.1, 0.0)


def test_only_the_recipe_itself_is_compared_with_the_published_number():
  """`:smoke`, an override or another dataset keep `config.published` no more (the report
  compared such runs with the paper's number); the recipe itself keeps it."""
  path = "configs/cifar100/pskd_preact_resnet18.py"
  recipe = load_config_file(path)
  assert config_check.drop_published_unless_recipe(recipe, path) is None
  assert recipe.published.top1 == 79.18
  smoke = load_config_file(path, "smoke")
  assert config_check.drop_published_unless_recipe(smoke, f"{path}:smoke") == (
      f"Published number not compared: this run is not the recipe of {path} (config.data."
      "limit_train: recipe 0, now 2048)")
  assert smoke.published is None
  changed = load_config_file(path)
  changed.method.alpha_T = 0.5
  note = config_check.drop_published_unless_recipe(changed, path)
  assert note.endswith("(config.method.alpha_T: recipe 0.8, now 0.5)") and changed.published is None
  # A config argument that picks a recipe (a distillation pair) is that recipe; with ',smoke'
  # it is not.
  pair = "configs/cifar100/dkd_mdistiller.py"
  vgg = load_config_file(pair, "vgg13-vgg8")
  assert config_check.drop_published_unless_recipe(vgg, f"{pair}:vgg13-vgg8") is None
  assert vgg.published.top1 == load_config_file(pair, "vgg13-vgg8").published.top1
  assert vgg.published.top1 != load_config_file(pair).published.top1  # not the default pair's
  vgg_smoke = load_config_file(pair, "vgg13-vgg8,smoke")
  assert config_check.drop_published_unless_recipe(vgg_smoke, f"{pair}:vgg13-vgg8,smoke")
  assert vgg_smoke.published is None
  kept = 0
  for config_file in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.py"))):
    config = load_config_file(config_file)  # every recipe keeps its own number
    if config.get("published"):
      assert config_check.drop_published_unless_recipe(config, config_file) is None, config_file
      kept += config.published is not None
  assert kept >= 10
  elsewhere = load_config_file(path)
  elsewhere.log_every_steps = 7  # a resumable key
  elsewhere.data.dir = "/data/tfds"  # where the data lives, as docs/RECIPES.md has CIFAR runs
  assert config_check.drop_published_unless_recipe(elsewhere, path) is None
