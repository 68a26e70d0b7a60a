"""DKD (alpha 1, beta per pair, T 4, warm-up 20 epochs),
on the CIFAR-100 distillation benchmark's teacher/student pairs.

Recipe: megvii-research/mdistiller `configs/cifar100/` and its trainer (`recipes.mdistiller`):
the RepDistiller/mdistiller networks with Kaiming-normal fan-out init, crop + flip with their
normalisation, 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 x0.1 at epochs 150, 180 and 210,
weight decay 5e-4 (docs/RECIPES.md).

The config argument picks the pair: `:resnet32x4-resnet8x4` (default), `:wrn40_2-wrn16_2`,
`:resnet56-resnet20`, `:vgg13-vgg8`; add `,smoke` for a 2-epoch smoke run.

DKD's beta is the pair's (mdistiller `configs/cifar100/dkd/<pair>.yaml`): 8 for
resnet32x4-resnet8x4, 6 for wrn40_2-wrn16_2 and vgg13-vgg8, 2 for resnet56-resnet20.

The teacher is `configs/cifar100/ce_mdistiller.py` on the pair's teacher network, trained by
our launcher first into `teachers/cifar100_ce_<teacher>` if missing (mdistiller downloads
RepDistiller's last-epoch checkpoints of that recipe) and shared by every student of it.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/dkd_mdistiller.py:resnet32x4-resnet8x4 \
        --workdir=runs/c100_dkd_resnet8x4 --config.data.dir=$HOME/tensorflow_datasets \
        --config.teacher.config.data.dir=$HOME/tensorflow_datasets

Published (mdistiller README, best test epoch, mean of 5 runs): DKD 76.32, 76.23, 71.97, 74.68
for the four pairs in the order above.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  pair, teacher, student, beta, smoke = recipes.distillation_pair(arg)
  config = recipes.mdistiller(student, smoke)
  config.method = method_config("dkd", alpha=1.0, beta=beta, temperature=4.0, warmup_epochs=20.0,
                                teacher="checkpoint")
  config.teacher = recipes.mdistiller_teacher(teacher, smoke)
  config.published = published_result(recipes.PAIR_RESULTS[pair]["dkd"], "best",
                                      "mdistiller README (DKD)")
  return config
