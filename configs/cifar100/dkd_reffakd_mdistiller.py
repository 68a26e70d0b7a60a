"""DKD from the ReffAKD soft labels (no teacher network), on the students of the
CIFAR-100 distillation benchmark: ReffAKD's pseudo-teacher in place of the pair's teacher.

Recipe: megvii-research/mdistiller `configs/cifar100/` and its trainer (`recipes.mdistiller`):
the RepDistiller/mdistiller networks with Kaiming-normal fan-out init, crop + flip with their
normalisation, 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 x0.1 at epochs 150, 180 and 210,
weight decay 5e-4 (docs/RECIPES.md).

The config argument picks the pair: `:resnet32x4-resnet8x4` (default), `:wrn40_2-wrn16_2`,
`:resnet56-resnet20`, `:vgg13-vgg8`; add `,smoke` for a 2-epoch smoke run.
Only the student of the pair is trained.

DKD's beta is the pair's (mdistiller `configs/cifar100/dkd/<pair>.yaml`): 8 for
resnet32x4-resnet8x4, 6 for wrn40_2-wrn16_2 and vgg13-vgg8, 2 for resnet56-resnet20.

The artifact `artifacts/reffakd_cifar100.json` (autoencoder class similarities) is made on first
use and shared with the other ReffAKD configs.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/dkd_reffakd_mdistiller.py:resnet32x4-resnet8x4 \
        --workdir=runs/c100_dkd_reffakd_resnet8x4 --config.data.dir=$HOME/tensorflow_datasets

Expected: no published number for this setting; compare with `dkd_mdistiller.py` on the same
pair.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  _, _, student, beta, smoke = recipes.distillation_pair(arg)
  config = recipes.mdistiller(student, smoke)
  config.method = method_config("dkd", alpha=1.0, beta=beta, temperature=4.0, warmup_epochs=20.0,
                                teacher="reffakd")
  return config
