"""Tf-KD_self (faithful: alpha 0.95, T 6, multiplier 50), CIFAR ResNet-18, CIFAR-100.

The official recipe (yuanli2333/Teacher-free-Knowledge-Distillation): the teacher is a ResNet-18
trained with plain CE (configs/cifar100/ce_resnet18.py); if `teachers/cifar100_ce_resnet18` has
no finished run, launch.py trains it there first, then the student (one command). By hand:

    python launch.py --config=configs/cifar100/ce_resnet18.py \
        --workdir=teachers/cifar100_ce_resnet18 --config.data.dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/tfkd_self_resnet18.py \
        --workdir=runs/c100_tfkd_self --config.data.dir=$HOME/tensorflow_datasets \
        --config.teacher.config.data.dir=$HOME/tensorflow_datasets

Expected (Tf-KD paper): 77.10 top-1 (baseline 75.87).
"""
from selfkd_jax.train.default_config import cifar100_tfkd_recipe, method_config, teacher_config


def get_config(arg=None):
  config = cifar100_tfkd_recipe(arg)
  config.method = method_config("tfkd_self", alpha=0.95, temperature=6.0, multiplier=50.0)
  config.teacher = teacher_config("configs/cifar100/ce_resnet18.py", arg,
                                  workdir="" if arg else "teachers/cifar100_ce_resnet18")
  return config
