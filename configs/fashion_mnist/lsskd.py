"""LSSKD (reconstruction; alpha_T 0.8, T 3, feature weight 0.03), LeNet-5-BN on Fashion-MNIST.

Every image is trained at 0/90/180/270 degrees (4x the images per step); HSAKD-style heads on
both LeNet conv blocks predict the joint (class, rotation) label with PS-KD targets from their
own past predictions (tables of 4N rows x 40 classes, sharded by rows); the main classifier gets
PS-KD on the upright copies; the deepest head teaches the shallower one (KL, T 3); adapters
pull each head's feature to the 84-d final feature. The heads are attached to the model
(`heads.ExitHead`) and trained by the run's optimizer; evaluation and export use LeNet-5-BN
alone. Every epoch logs each head's test top-1 (its
upright columns) and the ensemble.

    python launch.py --config=configs/fashion_mnist/lsskd.py --workdir=runs/fmnist_lsskd
    python launch.py --config=configs/fashion_mnist/lsskd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("lsskd", alpha_T=0.8, temperature=3.0, feature_weight=0.03)
  return config
