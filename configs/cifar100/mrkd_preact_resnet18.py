"""MrKD (reconstruction; alpha 0.5, T 4, one snapshot per epoch), PreAct ResNet-18, CIFAR-100.

No published recipe: PS-KD's (300 epochs, lr 0.1 x0.1 at 150/225) is used, as for LsrKD.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/mrkd_preact_resnet18.py --workdir=runs/c100_mrkd \
        --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("mrkd", alpha=0.5, temperature=4.0)
  return config
