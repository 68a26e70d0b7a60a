"""Cross-entropy baseline with Tf-KD's recipe, CIFAR ResNet-18, CIFAR-100 (Tf-KD_self's teacher).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/ce_resnet18.py --workdir=runs/c100_ce_resnet18 \
        --config.data.dir=$HOME/tensorflow_datasets

Expected (Tf-KD paper, ResNet-18 baseline): 75.87 top-1.
"""
from selfkd_jax.train.default_config import cifar100_tfkd_recipe, method_config


def get_config(arg=None):
  config = cifar100_tfkd_recipe(arg)
  config.method = method_config("ce")
  return config
