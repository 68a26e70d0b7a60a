"""RAS-KD (reconstruction; global-level target, EMA prototypes), PreAct ResNet-18 on CIFAR-100.

No recipe is public; this uses PS-KD's CIFAR-100 recipe (300 epochs, batch 128, SGD Nesterov,
lr 0.1 x0.1 at 150/225, wd 5e-4, crop + flip), the setting RAS-KD compares against. The
auxiliary classifier is trained by the run's optimizer and schedule. CIFAR-100 must be prepared
with TFDS first:

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/ras_kd_preact_resnet18.py \
        --workdir=runs/c100_ras_kd --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number we could check (the paper is paywalled).
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.method = method_config("ras_kd", epsilon=0.1, relation_temperature=0.1, momentum=0.9,
                                prototypes="ema", instance_weight=0.0)
  return config
