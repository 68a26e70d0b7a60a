"""CS-KD (T 4, lambda 1), CIFAR ResNet-18 (pre-activation), CIFAR-100: the official recipe.

alinlab/cs-kd `train.py` defaults: 200 epochs, 128 anchors + 128 same-class partners per step,
lr 0.1 /10 at 50% and 75%, weight decay 1e-4, no Nesterov.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/cskd_preact_resnet18.py --workdir=runs/c100_cskd \
        --config.data.dir=$HOME/tensorflow_datasets

Expected: see the CS-KD paper's CIFAR-100 ResNet-18 row (not reproduced here).
"""
from selfkd_jax.train.default_config import cifar100_cskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_cskd_recipe(arg)
  config.method = method_config("cskd", temperature=4.0, weight=1.0)
  return config
