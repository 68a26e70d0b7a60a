"""Zipf's label smoothing (lambda 0.1), LeNet-5-BN on Fashion-MNIST, ranking by the logits.

LeNet-5-BN flattens its last feature map into fully connected layers, so it has no per-position
("dense") logits to vote with: this config uses the `dense=False` variant of the official code,
which ranks the classes by the sample's own logits. The dense variant runs on the ResNets and
WRNs (configs/cifar100/zipf_preact_resnet18.py).

    python launch.py --config=configs/fashion_mnist/zipf.py --workdir=runs/fmnist_zipf
    python launch.py --config=configs/fashion_mnist/zipf.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.90 (benchmarks/results/fashion_mnist.md has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("zipf", weight=0.1, dense=False)
  return config
