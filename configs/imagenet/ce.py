"""Cross-entropy baseline, ResNet-152 (or ResNet-50) on ImageNet, PS-KD's ImageNet pipeline.

The recipe, how to prepare ImageNet, the commands for SLURM and a TPU pod slice, and the
published numbers are in docs/RECIPES.md ("ImageNet recipes"). The solver is our choice (the
standard 90-epoch ImageNet one); PS-KD publishes none. `:resnet152` (default) or `:resnet50`,
`,smoke` for 2 epochs on 2048 examples at 64 x 64. One GPU node:

    python launch.py --config=configs/imagenet/ce.py:resnet152 --workdir=/nfs/runs/in_ce \
        --config.data.dir=/nfs/tensorflow_datasets
"""
from selfkd_jax.train import imagenet_recipes
from selfkd_jax.train.default_config import method_config


def get_config(arg=None):
  return imagenet_recipes.pskd_imagenet_config(arg, method_config("ce"))
