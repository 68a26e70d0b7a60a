"""LsrKD (reconstruction; ours: alpha 0.1, T 2), LeNet-5-BN on Fashion-MNIST.

    python launch.py --config=configs/fashion_mnist/lsrkd.py --workdir=runs/fmnist_lsrkd
    python launch.py --config=configs/fashion_mnist/lsrkd.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.90 (benchmarks/results/fashion_mnist.md has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("lsrkd", alpha=0.1, temperature=2.0)
  return config
