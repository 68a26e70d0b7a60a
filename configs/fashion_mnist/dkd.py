"""DKD (alpha 1, beta 1, T 4, warm-up 5 epochs) from the CE-trained LeNet-5-BN teacher.

mdistiller's CIFAR-100 values are alpha 1, beta 8, T 4, warm-up 20 of 240 epochs. On this
15-epoch, 10-class recipe (lr 0.05) beta 8 with a 2-epoch warm-up diverged (NaN loss at step
483, when the warm-up reached 1); beta 1 (DKD uses 0.5 on ImageNet) with a 5-epoch warm-up
(weights 0.2, 0.4, ..., 1) trains. The teacher is shared with configs/fashion_mnist/kd.py
(`teachers/fashion_mnist_ce`, trained first if missing).

    python launch.py --config=configs/fashion_mnist/dkd.py --workdir=runs/fmnist_dkd
    python launch.py --config=configs/fashion_mnist/dkd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config, teacher_config

TEACHER_WORKDIR = "teachers/fashion_mnist_ce"


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("dkd", alpha=1.0, beta=1.0, temperature=4.0,
                                warmup_epochs=5.0, teacher="checkpoint")
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", arg,
                                  workdir="" if arg else TEACHER_WORKDIR)
  return config
