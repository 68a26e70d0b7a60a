"""Cross-entropy baseline, PreAct ResNet-18 on CIFAR-100 with PS-KD's published recipe.

Recipe: lgcnsai/PS-KD-Pytorch `main.py` as its README runs it (`recipes.pskd`): PreAct ResNet-18
with PyTorch's default init, crop (pad 4) + flip, kuangliu's normalisation, 300 epochs, batch
128, SGD momentum 0.9 Nesterov, lr 0.1 x0.1 at epochs 150 and 225, weight decay 5e-4
(docs/RECIPES.md). CIFAR-100 must be prepared with TFDS first (never downloaded at training
time):

    tfds build cifar100 --file_format=array_record --data_dir=$HOME/tensorflow_datasets
    python launch.py --config=configs/cifar100/ce_preact_resnet18.py \
        --workdir=runs/c100_ce --config.data.dir=$HOME/tensorflow_datasets

Published (PS-KD paper Table 1 and README, PreAct ResNet-18, top-1 error / NLL / ECE% /
AURCx1000): baseline 24.18/1.10/11.84/67.65, LS 20.94/0.98/10.79/57.74, PS-KD
20.82/0.76/1.77/52.10. The code keeps its best test epoch (`checkpoint_best.pth`), so the
report compares the best epoch.
"""
from selfkd_jax.train import cifar100_recipes as recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  config = recipes.pskd(arg)
  config.method = method_config("ce")
  config.published = published_result(75.82, "best", "PS-KD README (top-1 error 24.18)")
  return config
