"""Cross-entropy baseline, LeNet-5-BN on Fashion-MNIST (15 epochs, SGD Nesterov, cosine).

    python launch.py --config=configs/fashion_mnist/ce.py --workdir=runs/fmnist_ce
    python launch.py --config=configs/fashion_mnist/ce.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.91 (see README's results).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("ce")
  return config
