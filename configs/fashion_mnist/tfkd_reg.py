"""Tf-KD_reg (faithful: alpha 0.1, T 20, a 0.99, multiplier 100), LeNet-5-BN on Fashion-MNIST.

The CIFAR-100 hyper-parameters of the official code, unchanged, on the shared Fashion-MNIST
recipe; with C = 10 the multiplier's m/C factor is 10 (1 on CIFAR-100).

    python launch.py --config=configs/fashion_mnist/tfkd_reg.py --workdir=runs/fmnist_tfkd_reg
    python launch.py --config=configs/fashion_mnist/tfkd_reg.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.90 (benchmarks/results/fashion_mnist.md has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("tfkd_reg", alpha=0.1, temperature=20.0, multiplier=100.0)
  return config
