"""KD (alpha 0.9, T 4) from the ReffAKD soft labels as a pseudo-teacher, LeNet-5-BN.

No network teacher: the teacher logits of an example are `log S_soft[y]`, the ReffAKD soft-label
row of its class, tempered like any teacher (`softmax(log S_soft[y] / T)`). The artifact is the
one the ReffAKD config uses (`artifacts/reffakd_fashion_mnist.json`, made on first use with a
10-epoch autoencoder). Teachers loaded from checkpoints come with the teacher-methods work.

    python launch.py --config=configs/fashion_mnist/kd_reffakd.py --workdir=runs/fmnist_kd_reffakd
    python launch.py --config=configs/fashion_mnist/kd_reffakd.py:smoke --workdir=/tmp/smoke

Expected: test top-1 about 0.85 with NLL about 1.7: these soft labels are nearly uniform
(benchmarks/results/fashion_mnist has the measured table).
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("kd", alpha=0.9, temperature=4.0, teacher="reffakd",
                                autoencoder_epochs=10)
  return config
