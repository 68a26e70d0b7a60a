"""KD (alpha 0.9, T 4) from the ReffAKD soft labels as a pseudo-teacher, PreAct ResNet-18, CIFAR-100.

The artifact `artifacts/reffakd_cifar100.json` is shared with the ReffAKD config (made on first
use). PS-KD's recipe (ours for this pairing). CIFAR-100 must be prepared with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/kd_reffakd_preact_resnet18.py \
        --workdir=runs/c100_kd_reffakd --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("kd", alpha=0.9, temperature=4.0, teacher="reffakd")
  return config
