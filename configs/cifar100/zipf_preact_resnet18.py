"""Zipf's label smoothing (dense voting, x2 bilinear upsampling, lambda 0.1), PreAct ResNet-18,
CIFAR-100: megvii-research/zipfls's PyTorch recipe.

Recipe: `pytorch_zipfls/train.py` as `pytorch_zipfls/README.md` runs it for CIFAR-100 (`--arch
CIFAR_ResNet18 --loss_lambda 0.1 --dense --upsample bilinear`; `recipes.zipf`): CS-KD's script,
network (pre-activation, PyTorch's default init) and schedule, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 /10 from epochs 101 and 151, weight decay 1e-4, crop + flip, kuangliu's
normalisation (docs/RECIPES.md).

Upsampling: the PyTorch README's command votes on the 4x4 map upsampled bilinearly to 8x8 (this
config); the top-level README's command does not upsample (`--config.method.upsample=1`). Which
of the two produced 77.38 is not stated upstream.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/zipf_preact_resnet18.py \
        --workdir=runs/c100_zipf --config.data.dir=$HOME/tensorflow_datasets

Published (zipfls README, PyTorch, CIFAR-100 ResNet-18, best test epoch, mean +- std over runs):
baseline 75.51 +- 0.28, Zipf's LS 77.38 +- 0.32.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  config = recipes.zipf(arg)
  config.method = method_config("zipf", weight=0.1, dense=True, upsample=2)
  config.published = published_result(77.38, "best", "zipfls README (PyTorch, +- 0.32)")
  return config
