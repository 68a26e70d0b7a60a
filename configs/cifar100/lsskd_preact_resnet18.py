"""LSSKD (reconstruction; alpha_T 0.8, T 3, feature weight 0.03), PreAct ResNet-18, CIFAR-100.

HSAKD-style heads (copies of the later PreAct stages, 400 joint classes) on all four stages.
LSSKD published no code; it builds on HSAKD, whose CIFAR-100 solver this uses
(`recipes.hsakd`: winycg/HSAKD `train_student_cifar.py`: 240 epochs, batch 64, SGD momentum
0.9 Nesterov, lr 0.05 x0.1 at 150/180/210, wd 5e-4, crop + flip, its normalisation) on PS-KD's
PreAct ResNet-18 with Kaiming-normal fan-out init (docs/RECIPES.md). Each step trains on 4 x 64
rotated images. The past-prediction state is 1 + 16 x 4 tables of N x C: 1.3 GB in float32
over all devices (`--config.method.storage_dtype=bfloat16` halves it).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/lsskd_preact_resnet18.py \
        --workdir=runs/c100_lsskd --config.data.dir=$HOME/tensorflow_datasets

Expected (paper claim): +4.54 points over PS-KD on CIFAR-100 on average (not reproduced here).
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  config = recipes.hsakd(arg)
  config.method = method_config("lsskd", alpha_T=0.8, temperature=3.0, feature_weight=0.03)
  return config
