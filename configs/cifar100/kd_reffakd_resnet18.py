"""KD (alpha 0.9, T 4) from the ReffAKD soft labels as a pseudo-teacher, ResNet-18, CIFAR-100.

Recipe: JEKimLab/ReffAKD `cifar100/tinySLG_distillation.ipynb` (`recipes.reffakd`):
post-activation ResNet-18 with PyTorch's default init, crop + flip + RandomRotation(15),
CIFAR-100's own normalisation, 200 epochs, batch 128, SGD momentum 0.9, lr 0.1 x0.2 at epochs
60, 120 and 160, weight decay 5e-4 (docs/RECIPES.md). The notebook sweeps T in {20, 10, 5, 1}
and alpha in {0.1, ..., 0.9} and publishes no single setting; the values here are ours.

The artifact `artifacts/reffakd_cifar100.json` is made on first use (the notebooks' 200
autoencoder epochs, delta 0.0225, 40 images per class) or beforehand with
`python -m selfkd_jax.reffakd --dataset=cifar100 --out=artifacts/reffakd_cifar100.json
--data_dir=$HOME/tensorflow_datasets`.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/kd_reffakd_resnet18.py \
        --workdir=runs/c100_kd_reffakd --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  config = recipes.reffakd(arg)
  config.method = method_config("kd", alpha=0.9, temperature=4.0, teacher="reffakd")
  return config
