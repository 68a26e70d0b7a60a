"""ReffAKD (autoencoder soft labels, faithful CIFAR-100 loss), PreAct ResNet-18 on CIFAR-100.

The artifact `artifacts/reffakd_cifar100.json` is made on first use (the notebooks' 200
autoencoder epochs, delta 0.0225, 40 images per class) or beforehand with
`python -m selfkd_jax.reffakd --dataset=cifar100 --out=artifacts/reffakd_cifar100.json
--data_dir=$HOME/tensorflow_datasets`. The training recipe is PS-KD's (300 epochs, SGD
Nesterov, lr 0.1 x0.1 at 150/225), ours: the notebooks' student recipe is not comparable.
CIFAR-100 must be prepared with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/reffakd_preact_resnet18.py \
        --workdir=runs/c100_reffakd --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting.
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("reffakd", alpha=0.5, temperature=1.0, variant="faithful")
  return config
