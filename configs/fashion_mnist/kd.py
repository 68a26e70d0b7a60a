"""KD (alpha 0.9, T 4) from a CE-trained LeNet-5-BN teacher, LeNet-5-BN on Fashion-MNIST.

The teacher is `configs/fashion_mnist/ce.py` (the same architecture and recipe, seed 0) in
`teachers/fashion_mnist_ce` (relative to the working directory): the first student that finds
it missing trains it there first, and every KD-family config and seed shares it. Its checksum is
pinned in the student's workdir (teacher.json). A smoke run trains a smoke teacher inside its
own workdir instead.

    python launch.py --config=configs/fashion_mnist/kd.py --workdir=runs/fmnist_kd
    python launch.py --config=configs/fashion_mnist/kd.py:smoke --workdir=/tmp/smoke
    # another teacher, e.g. trained longer, in its own workdir:
    python launch.py --config=configs/fashion_mnist/kd.py --workdir=runs/fmnist_kd_t30 \
        --config.teacher.config.num_epochs=30 --config.teacher.workdir=teachers/fmnist_ce_30

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config, teacher_config

TEACHER_WORKDIR = "teachers/fashion_mnist_ce"


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("kd", alpha=0.9, temperature=4.0, teacher="checkpoint")
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", arg,
                                  workdir="" if arg else TEACHER_WORKDIR)
  return config
