"""PS-KD (alpha_T 0.8, faithful per-step refresh), LeNet-5-BN on Fashion-MNIST. The default run.

    python launch.py --config=configs/fashion_mnist/pskd.py --workdir=runs/fmnist_pskd
    python launch.py --config=configs/fashion_mnist/pskd.py:smoke --workdir=/tmp/smoke
    python launch.py   # the same config, workdir runs/default

Expected: test top-1 about 0.91 (>= 0.89) in a few minutes on a 2-core CPU.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("pskd", alpha_T=0.8)
  return config
