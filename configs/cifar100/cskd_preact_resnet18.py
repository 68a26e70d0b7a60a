"""CS-KD (T 4, lambda 1), PreAct ResNet-18, CIFAR-100: alinlab/cs-kd's recipe.

Recipe: alinlab/cs-kd `train.py` as its README runs it (`recipes.cskd`): their `CIFAR_ResNet18`
(pre-activation, PS-KD's network) with PyTorch's default init, crop + flip, kuangliu's
normalisation, 200 epochs, 128 anchors + 128 same-class partners per step, SGD momentum 0.9, lr
0.1 /10 from epochs 101 and 151 (their decay after the epoch reaching 50%/75%), weight decay
1e-4 (docs/RECIPES.md).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/cskd_preact_resnet18.py \
        --workdir=runs/c100_cskd --config.data.dir=$HOME/tensorflow_datasets

Published: the CS-KD paper reports best-epoch top-1 error over 3 runs; its CIFAR-100 table is not
in the repository and was not checked here, so no `config.published` is set. (PS-KD's README
reports its own CS-KD rerun under PS-KD's recipe: 21.30 error.)
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  config = recipes.cskd(arg)
  config.method = method_config("cskd", temperature=4.0, weight=1.0)
  return config
