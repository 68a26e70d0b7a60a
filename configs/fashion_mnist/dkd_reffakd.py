"""DKD (alpha 1, beta 1, T 4, warm-up 5 epochs, as configs/fashion_mnist/dkd.py) from the ReffAKD soft labels as a pseudo-teacher,
LeNet-5-BN on Fashion-MNIST.

The teacher logits of an example are `log S_soft[y]` (the artifact of the ReffAKD config,
`artifacts/reffakd_fashion_mnist.json`, made on first use with a 10-epoch autoencoder). With a
label-only teacher, NCKD distils the class-similarity row of the label and TCKD its target mass.

    python launch.py --config=configs/fashion_mnist/dkd_reffakd.py --workdir=runs/fmnist_dkd_r
    python launch.py --config=configs/fashion_mnist/dkd_reffakd.py:smoke --workdir=/tmp/smoke

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("dkd", alpha=1.0, beta=1.0, temperature=4.0,
                                warmup_epochs=5.0, teacher="reffakd", autoencoder_epochs=10)
  return config
