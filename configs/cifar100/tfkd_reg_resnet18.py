"""Tf-KD_reg (faithful), ResNet-18 on CIFAR-100 with the official code's recipe.

alpha 0.1, T 20, multiplier 100 (`experiments/base_experiments/base_resnet18/params.json`);
200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with a one-epoch warm-up and x0.2 at 60/120/160,
weight decay 5e-4, crop + flip. CIFAR-100 must be prepared with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/tfkd_reg_resnet18.py \
        --workdir=runs/c100_tfkd_reg --config.data.dir=$HOME/tensorflow_datasets

Published (Tf-KD paper, CIFAR-100 top-1): ResNet-18 baseline 75.87, Tf-KD_reg 77.36, LS 77.26.
"""
from selfkd_jax.train.default_config import cifar100_tfkd_recipe, method_config


def get_config(arg=None):
  config = cifar100_tfkd_recipe(arg)
  config.method = method_config("tfkd_reg", alpha=0.1, temperature=20.0, multiplier=100.0)
  return config
