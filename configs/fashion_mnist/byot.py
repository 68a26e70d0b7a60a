"""BYOT (journal: alpha 0.3, T 3, lambda 0.03, no T^2, unsquared batch L2), LeNet-5-BN on
Fashion-MNIST.

LeNet-5-BN has two stages (the two conv blocks), so there is one auxiliary exit: a stride-2
SepConv block on the 14x14x6 block-1 map (attention gate, 7x7x16), pooled, a linear classifier
and a linear adapter to the 84-d feature. The exit and its optimizer state live in the method
state; evaluation and export use LeNet-5-BN alone (61,728 parameters). Every epoch logs each
exit's test top-1 and the ensemble of the exit and the classifier.

    python launch.py --config=configs/fashion_mnist/byot.py --workdir=runs/fmnist_byot
    python launch.py --config=configs/fashion_mnist/byot.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("byot", alpha=0.3, temperature=3.0, feature_weight=0.03,
                                variant="journal")
  return config
