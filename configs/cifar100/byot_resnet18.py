"""BYOT (journal: alpha 0.3, T 3, lambda 0.03), ResNet-18, CIFAR-100: the journal code's recipe.

Three auxiliary exits (after stages 1-3: attention gate, SepConv stacks to 4x4x512, pool, FC,
linear adapter). Recipe: ArchipLab-LinfengZhang/pytorch-self-distillation-final `train.py`
defaults (`recipes.byot`): post-activation ResNet-18 with Kaiming-normal fan-out convs,
RandomCrop(32, 4, fill 128) + flip + AutoAugment (CIFAR-10 policy) + Cutout(16), kuangliu's
normalisation, 250 epochs, batch 128, SGD momentum 0.9, lr 0.1 /10 at epochs 83, 166 and 240,
weight decay 5e-4; its feature term skips the shallowest exit (`feature_exits=(1, 2)`)
(docs/RECIPES.md).

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/byot_resnet18.py \
        --workdir=runs/c100_byot --config.data.dir=$HOME/tensorflow_datasets

Published: none for this code. The conference paper's ResNet-18 (78.64 for the deepest
classifier) was trained by an unpublished recipe without AutoAugment; the journal code tracks
its best epoch on the ensemble of the four classifiers. No `config.published` is set.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  config = recipes.byot(arg)
  config.method = method_config("byot", alpha=0.3, temperature=3.0, feature_weight=0.03,
                                variant="journal", feature_exits=(1, 2))
  return config
