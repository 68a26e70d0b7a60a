"""Tf-KD_reg (virtual teacher: alpha 0.1, T 20, multiplier 100, p 0.99), ResNet-18, CIFAR-100.

Recipe: yuanli2333/Teacher-free-Knowledge-Distillation (`recipes.tfkd`): post-activation
ResNet-18 with PyTorch's default init, crop + flip + RandomRotation(15), their normalisation,
200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with a linear warm-up over epoch 0 then x0.2 at
epochs 60, 120 and 160, weight decay 5e-4 (docs/RECIPES.md).

Method values from `experiments/base_experiments/base_resnet18/params.json`.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/tfkd_reg_resnet18.py \
        --workdir=runs/c100_tfkd_reg --config.data.dir=$HOME/tensorflow_datasets

Published (Tf-KD README, ResNet-18, CIFAR-100 top-1): baseline 75.87, Tf-KD_self 77.10, Tf-KD_reg
77.36. The code writes both its best and last epoch; the report compares the best.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  config = recipes.tfkd(arg)
  config.method = method_config("tfkd_reg", alpha=0.1, temperature=20.0, multiplier=100.0)
  config.published = published_result(77.36, "best", "Tf-KD README (Tf-KD_reg, ResNet18)")
  return config
