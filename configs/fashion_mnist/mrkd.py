"""MrKD (reconstruction; alpha 0.5, T 4, one snapshot refreshed every epoch), LeNet-5-BN on
Fashion-MNIST.

The teacher of epoch e is the model itself at the end of epoch e-1 (weights and BatchNorm
statistics, eval mode); epoch 0 trains with plain CE. The defaults are ours (no code or full
text of the paper).

    python launch.py --config=configs/fashion_mnist/mrkd.py --workdir=runs/fmnist_mrkd
    python launch.py --config=configs/fashion_mnist/mrkd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("mrkd", alpha=0.5, temperature=4.0, refresh_every=0,
                                num_snapshots=1)
  return config
