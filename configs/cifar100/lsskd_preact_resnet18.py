"""LSSKD (reconstruction; alpha_T 0.8, T 3, feature weight 0.03), PreAct ResNet-18, CIFAR-100.

HSAKD-style heads (copies of the later PreAct stages, 400 joint classes) on all four stages;
PS-KD's recipe (300 epochs, lr 0.1 x0.1 at 150/225), as LSSKD builds on PS-KD. Each step trains
on 4 x 128 rotated images. The past-prediction state is 1 + 16 x 4 tables of N x C: 1.3 GB in
float32 over all devices (`--config.method.storage_dtype=bfloat16` halves it).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/lsskd_preact_resnet18.py --workdir=runs/c100_lsskd \
        --config.data.dir=$HOME/tensorflow_datasets

Expected (paper claim): +4.54 points over PS-KD on CIFAR-100 on average (not reproduced here).
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("lsskd", alpha_T=0.8, temperature=3.0, feature_weight=0.03)
  return config
