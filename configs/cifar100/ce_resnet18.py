"""Cross-entropy baseline with Tf-KD's recipe, ResNet-18, CIFAR-100 (Tf-KD_self's teacher).

Recipe: yuanli2333/Teacher-free-Knowledge-Distillation (`recipes.tfkd`): post-activation
ResNet-18 with PyTorch's default init, crop + flip + RandomRotation(15), their normalisation,
200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with a linear warm-up over epoch 0 then x0.2 at
epochs 60, 120 and 160, weight decay 5e-4 (docs/RECIPES.md).

Tf-KD_self distils from this run's best test epoch (`best.pth.tar`), so
`configs/cifar100/tfkd_self_resnet18.py` sets `keep_best_checkpoint` on it.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/ce_resnet18.py \
        --workdir=runs/c100_ce_resnet18 --config.data.dir=$HOME/tensorflow_datasets

Published (Tf-KD README, ResNet-18, CIFAR-100 top-1): baseline 75.87, Tf-KD_self 77.10, Tf-KD_reg
77.36. The code writes both its best and last epoch; the report compares the best.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  config = recipes.tfkd(arg)
  config.method = method_config("ce")
  config.published = published_result(75.87, "best", "Tf-KD README (ResNet18 baseline)")
  return config
