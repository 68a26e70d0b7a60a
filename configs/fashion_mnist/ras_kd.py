"""RAS-KD (reconstruction; global-level target, EMA prototypes), LeNet-5-BN on Fashion-MNIST.

Defaults are ours (the paper is paywalled, no code): epsilon 0.1, relation temperature 0.1,
EMA momentum 0.9, no instance-level term (`--config.method.instance_weight=1.0` adds it).

    python launch.py --config=configs/fashion_mnist/ras_kd.py --workdir=runs/fmnist_ras_kd
    python launch.py --config=configs/fashion_mnist/ras_kd.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.90 (benchmarks/results/fashion_mnist.md has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("ras_kd", epsilon=0.1, relation_temperature=0.1, momentum=0.9,
                                prototypes="ema", instance_weight=0.0)
  return config
