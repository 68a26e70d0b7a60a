"""KD (alpha 0.9, T 4), WRN-16-2 student, PreAct ResNet-18 CE teacher, CIFAR-100.

mdistiller's CIFAR recipe (240 epochs, batch 64, lr 0.05, x0.1 at 150/180/210). mdistiller's
own teachers (ResNet32x4, WRN-40-2, ...) are not in our model zoo; the teacher here is
configs/cifar100/ce_preact_resnet18.py, trained first into `teachers/cifar100_ce_preact_resnet18`
if missing (shared by the KD-family configs).

    python launch.py --config=configs/cifar100/kd_wrn16_2.py --workdir=runs/c100_kd \
        --config.data.dir=$HOME/tensorflow_datasets \
        --config.teacher.config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this pair (mdistiller's WRN-40-2 -> WRN-16-2: KD 74.92).
"""
from selfkd_jax.train.default_config import (cifar100_mdistiller_recipe, method_config,
                                             teacher_config)


def get_config(arg=None):
  config = cifar100_mdistiller_recipe(arg)
  config.method = method_config("kd", alpha=0.9, temperature=4.0, teacher="checkpoint")
  config.teacher = teacher_config("configs/cifar100/ce_preact_resnet18.py", arg,
                                  workdir="" if arg else "teachers/cifar100_ce_preact_resnet18")
  return config
