"""MrKD+TC (reconstruction; tc='mix', beta 0.5), PreAct ResNet-18, CIFAR-100, PS-KD's recipe.

No official code or recipe was published with the method; this uses PS-KD's CIFAR-100 recipe
(`recipes.pskd`: PreAct ResNet-18, PyTorch's default init, 300 epochs, batch 128, SGD Nesterov,
lr 0.1 x0.1 at 150/225, wd 5e-4, crop + flip) so the numbers sit next to PS-KD's
(docs/RECIPES.md). CIFAR-100 must be prepared with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/mrkd_tc_preact_resnet18.py \
        --workdir=runs/c100_mrkd_tc --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  config = recipes.pskd(arg)
  config.method = method_config("mrkd_tc", alpha=0.5, temperature=4.0, tc="mix")
  return config
