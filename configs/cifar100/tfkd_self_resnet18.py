"""Tf-KD_self (alpha 0.95, T 6, multiplier 50), ResNet-18 student and its best-epoch ResNet-18 CE
teacher, CIFAR-100.

Recipe: yuanli2333/Teacher-free-Knowledge-Distillation (`recipes.tfkd`): post-activation
ResNet-18 with PyTorch's default init, crop + flip + RandomRotation(15), their normalisation,
200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with a linear warm-up over epoch 0 then x0.2 at
epochs 60, 120 and 160, weight decay 5e-4 (docs/RECIPES.md).

Method values from `experiments/kd_experiments/resnet18_distill/resnet18_self_teacher/
params.json`. The teacher is `configs/cifar100/ce_resnet18.py`, trained
first into `teachers/cifar100_ce_resnet18` if missing, keeping its best test epoch, which is the
one distilled (`checkpoint='best'`: their `best.pth.tar`).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/tfkd_self_resnet18.py \
        --workdir=runs/c100_tfkd_self --config.data.dir=$HOME/tensorflow_datasets \
        --config.teacher.config.data.dir=$HOME/tensorflow_datasets

Published (Tf-KD README, ResNet-18, CIFAR-100 top-1): baseline 75.87, Tf-KD_self 77.10, Tf-KD_reg
77.36. The code writes both its best and last epoch; the report compares the best.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result, teacher_config


def get_config(arg=None):
  config = recipes.tfkd(arg)
  config.method = method_config("tfkd_self", alpha=0.95, temperature=6.0, multiplier=50.0)
  config.teacher = teacher_config("configs/cifar100/ce_resnet18.py", arg, checkpoint="best",
                                  workdir="" if arg else "teachers/cifar100_ce_resnet18")
  config.published = published_result(77.10, "best", "Tf-KD README (Tf-KD_self, ResNet18)")
  return config
