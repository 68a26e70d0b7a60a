"""MrKD+TC (reconstruction; MrKD's snapshot teacher mixed towards the label, beta 0.5, always),
LeNet-5-BN on Fashion-MNIST.

`tc='mix'`: q' = 0.5 e_y + 0.5 q_snapshot. `--config.method.tc=swap` swaps the snapshot's
largest and true-class entries instead; `--config.method.tc_when=wrong` corrects only the
examples the snapshot gets wrong. Defaults are ours.

    python launch.py --config=configs/fashion_mnist/mrkd_tc.py --workdir=runs/fmnist_mrkd_tc
    python launch.py --config=configs/fashion_mnist/mrkd_tc.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("mrkd_tc", alpha=0.5, temperature=4.0, refresh_every=0,
                                num_snapshots=1, tc="mix", tc_beta=0.5, tc_when="always")
  return config
