"""Zipf's label smoothing (dense voting, x2 bilinear upsampling, lambda 0.1), ResNet-18, CIFAR-100.

The official PyTorch recipe: 200 epochs, batch 128, SGD momentum 0.9, lr 0.1 /10 at epochs 100
and 150, weight decay 1e-4, crop + flip. CIFAR-100 must be prepared with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/zipf_resnet18.py \
        --workdir=runs/c100_zipf --config.data.dir=$HOME/tensorflow_datasets

Published (zipfls README, PyTorch, CIFAR-100 top-1): ResNet-18 baseline 75.51 +- 0.28,
Zipf's LS 77.38 +- 0.32.
"""
from selfkd_jax.train.default_config import cifar100_zipf_recipe, method_config


def get_config(arg=None):
  config = cifar100_zipf_recipe(arg)
  config.method = method_config("zipf", weight=0.1, dense=True, upsample=2)
  return config
