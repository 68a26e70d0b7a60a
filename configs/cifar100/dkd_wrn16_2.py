"""DKD (alpha 1, beta 8, T 4, warm-up 20 epochs), WRN-16-2 student, PreAct ResNet-18 CE teacher,
CIFAR-100.

mdistiller's CIFAR recipe and DKD defaults (its WRN-40-2 -> WRN-16-2 yaml uses beta 6; our
teacher differs, so the default 8 stays). The teacher is shared with kd_wrn16_2.py.

    python launch.py --config=configs/cifar100/dkd_wrn16_2.py --workdir=runs/c100_dkd \
        --config.data.dir=$HOME/tensorflow_datasets \
        --config.teacher.config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this pair (mdistiller's WRN-40-2 -> WRN-16-2: DKD 76.24).
"""
from selfkd_jax.train.default_config import (cifar100_mdistiller_recipe, method_config,
                                             teacher_config)


def get_config(arg=None):
  config = cifar100_mdistiller_recipe(arg)
  config.method = method_config("dkd", alpha=1.0, beta=8.0, temperature=4.0,
                                warmup_epochs=20.0, teacher="checkpoint")
  config.teacher = teacher_config("configs/cifar100/ce_preact_resnet18.py", arg,
                                  workdir="" if arg else "teachers/cifar100_ce_preact_resnet18")
  return config
