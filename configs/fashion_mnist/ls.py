"""Label smoothing (eps 0.1, optax convention), LeNet-5-BN on Fashion-MNIST.

    python launch.py --config=configs/fashion_mnist/ls.py --workdir=runs/fmnist_ls
    python launch.py --config=configs/fashion_mnist/ls.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.91 (see README's results).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("ls", epsilon=0.1)
  return config
