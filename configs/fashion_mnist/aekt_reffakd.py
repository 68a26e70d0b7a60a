"""AEKT (reconstruction) from the ReffAKD soft labels as a pseudo-teacher, LeNet-5-BN on
Fashion-MNIST: the teacher-free AEKT of the seed paper's setting.

As configs/fashion_mnist/aekt.py, with teacher logits `log S_soft[y]` from the ReffAKD config's
artifact (`artifacts/reffakd_fashion_mnist.json`, made on first use, 10-epoch autoencoder).

    python launch.py --config=configs/fashion_mnist/aekt_reffakd.py --workdir=runs/fmnist_aekt_r
    python launch.py --config=configs/fashion_mnist/aekt_reffakd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("aekt", alpha=1.0, beta=1.0, temperature=4.0,
                                warmup_epochs=5.0, teacher="reffakd", autoencoder_epochs=10)
  return config
