"""BYOT (journal: alpha 0.3, T 3, lambda 0.03), PreAct ResNet-18, CIFAR-100.

Three auxiliary exits (after stages 1-3: attention gate, SepConv stacks to 4x4x512, pool, FC,
linear adapter). Recipe of the official code (ArchipLab-LinfengZhang/pytorch-self-distillation-
final `train.py`): 250 epochs, batch 128, SGD momentum 0.9, lr 0.1 /10 at epochs 83, 166 and
240, weight decay 5e-4; its feature term skips the third exit (`feature_exits=(1, 2)`). Not
reproduced: its AutoAugment + Cutout (we crop and flip only), and it uses a plain CIFAR
ResNet-18 (`--config.model.name=resnet18`) where the issue asks for PreAct ResNet-18.

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/byot_preact_resnet18.py --workdir=runs/c100_byot \
        --config.data.dir=$HOME/tensorflow_datasets

Expected (BYOT, ResNet-18, CIFAR-100, with AutoAugment): deepest exit about 78.6 top-1.
"""
from selfkd_jax.train.default_config import cifar100_pskd_recipe, method_config


def get_config(arg=None):
  config = cifar100_pskd_recipe(arg)
  config.num_epochs = 250 if not arg else config.num_epochs
  config.optimizer.nesterov = False
  config.optimizer.milestones = (83, 166, 240)
  config.method = method_config("byot", alpha=0.3, temperature=3.0, feature_weight=0.03,
                                variant="journal", feature_exits=(1, 2))
  return config
