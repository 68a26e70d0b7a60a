"""CS-KD (T 4, lambda 1, the official defaults), LeNet-5-BN on Fashion-MNIST.

Each of the 128 anchors of a step gets a same-class partner from the data pipeline (a pure
function of the seed, the step and the anchor's index, so resume needs no sampler state); the
partners go through the model without gradient, so a step runs 256 images forward.

    python launch.py --config=configs/fashion_mnist/cskd.py --workdir=runs/fmnist_cskd
    python launch.py --config=configs/fashion_mnist/cskd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("cskd", temperature=4.0, weight=1.0)
  return config
