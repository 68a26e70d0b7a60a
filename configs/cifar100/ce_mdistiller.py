"""Cross-entropy training of the CIFAR-100 distillation benchmark's networks (teachers and
students alone).

Recipe: megvii-research/mdistiller `configs/cifar100/` and its trainer (`recipes.mdistiller`):
the RepDistiller/mdistiller networks with Kaiming-normal fan-out init, crop + flip with their
normalisation, 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 x0.1 at epochs 150, 180 and 210,
weight decay 5e-4 (docs/RECIPES.md).

The config argument names the network: one of resnet32x4 (default), resnet8x4, wrn40_2,
wrn16_2_nobias, resnet56, resnet20, vgg13, vgg8; add `,smoke` for a 2-epoch smoke run. The
distillation configs (`kd_mdistiller.py`, `dkd_mdistiller.py`, `aekt_mdistiller.py`) train
their teacher with it.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/ce_mdistiller.py:resnet32x4 \
        --workdir=runs/c100_ce_resnet32x4 --config.data.dir=$HOME/tensorflow_datasets

Published (RepDistiller README, "Benchmark Results on CIFAR-100", best test epoch): teachers
ResNet32x4 79.42, WRN-40-2 75.61, ResNet56 72.34, VGG13 74.64; students alone ResNet8x4 72.50,
WRN-16-2 73.26, ResNet20 69.06, VGG8 70.36.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, parse_arg, published_result

MODELS = ("resnet32x4", "resnet8x4", "wrn40_2", "wrn16_2_nobias", "resnet56", "resnet20",
          "vgg13", "vgg8")


def get_config(arg=None):
  model, smoke = parse_arg(arg, MODELS)
  model = model or MODELS[0]
  config = recipes.mdistiller(model, smoke)
  config.method = method_config("ce")
  for pair, (teacher, student, _) in recipes.DISTILLATION_PAIRS.items():
    if model in (teacher, student):
      role = "teacher" if model == teacher else "student"
      config.published = published_result(recipes.PAIR_RESULTS[pair][role], "best",
                                           f"RepDistiller README ({pair}, {role})")
  return config
