"""Tf-KD_self (faithful: alpha 0.95, T 6, multiplier 5), LeNet-5-BN on Fashion-MNIST.

Two stages from one command: the teacher is the same architecture trained with plain CE
(configs/fashion_mnist/ce.py, seed 0, in `teachers/fashion_mnist_ce`, shared with kd.py); if it
is missing, launch.py trains it first and then the student. The two documented commands do the
same by hand:

    python launch.py --config=configs/fashion_mnist/ce.py --workdir=teachers/fashion_mnist_ce
    python launch.py --config=configs/fashion_mnist/tfkd_self.py --workdir=runs/fmnist_tfkd_self

The official ResNet-18 CIFAR-100 values are alpha 0.95, T 6, m 50; the code's per-example KL
weight is alpha * m / C = 0.475 there, and m = 5 keeps it for C = 10 (as tfkd_reg.py does).

    python launch.py --config=configs/fashion_mnist/tfkd_self.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config, teacher_config

TEACHER_WORKDIR = "teachers/fashion_mnist_ce"


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("tfkd_self", alpha=0.95, temperature=6.0, multiplier=5.0)
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", arg,
                                  workdir="" if arg else TEACHER_WORKDIR)
  return config
