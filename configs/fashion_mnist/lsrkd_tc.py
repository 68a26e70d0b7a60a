"""LsrKD + Teacher Correction (reconstruction; ours: alpha 0.1, T 2, beta 0.5), LeNet-5-BN.

    python launch.py --config=configs/fashion_mnist/lsrkd_tc.py --workdir=runs/fmnist_lsrkd_tc
    python launch.py --config=configs/fashion_mnist/lsrkd_tc.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.90 (benchmarks/results/fashion_mnist.md has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("lsrkd_tc", alpha=0.1, temperature=2.0, beta=0.5)
  return config
