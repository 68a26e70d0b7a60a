"""MrKD+TC (reconstruction; tc='mix', beta 0.5), PreAct ResNet-18, CIFAR-100, PS-KD's recipe.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/mrkd_tc_preact_resnet18.py \
        --workdir=runs/c100_mrkd_tc --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("mrkd_tc", alpha=0.5, temperature=4.0, tc="mix")
  return config
