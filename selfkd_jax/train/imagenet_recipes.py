"""The ImageNet recipe of PS-KD's official script, for ResNet-50 and ResNet-152.

lgcnsai/PS-KD-Pytorch trains ImageNet with `main.py --data_type imagenet` (ResNet-152 is its
ImageNet network, `models/resnet_imagenet.py`: torchvision's layout, Kaiming-normal fan-out convs)
and `loader/custom_dataloader.py`'s ImageNet branch:

- train: `RandomResizedCrop(224)` (scale 0.08-1, ratio 3/4-4/3) -> `RandomHorizontalFlip()` ->
  `ToTensor()` -> `ColorJitter(0.4, 0.4, 0.4)` -> `Lighting(0.1)` -> `Normalize(ImageNet)`;
- eval: `Resize(256)` -> `CenterCrop(224)` -> `Normalize(ImageNet)`.

Here the crop runs on the host in grain workers (`config.data.image_size`, `resize_size`), the
flip, colour jitter, lighting and normalisation on the device, all drawn per example from
(seed, epoch, index).

The solver is not in the script's defaults (they are CIFAR-100's: 300 epochs, lr 0.1 x0.1 at
150/225, wd 5e-4) nor in its README, which gives no ImageNet command. This uses the standard
ImageNet ResNet solver (He et al. 2016; torchvision's reference recipe): 90 epochs, global batch
256, SGD momentum 0.9, lr 0.1 x0.1 at epochs 30 and 60, weight decay 1e-4. It is our choice,
stated in every config and in docs/RECIPES.md; `--config.optimizer.*` and
`--config.num_epochs` change it.
"""

from __future__ import annotations

import ml_collections

from selfkd_jax.train.default_config import (apply_smoke, base_config, parse_arg,
                                             published_result)

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MODELS = ("resnet152", "resnet50")
# Top-1 error of PS-KD's README "Results on ImageNet" (ResNet-152): its code keeps the best
# test epoch (`checkpoint_best.pth`).
PUBLISHED_ERROR = {"ce": 22.19, "ls": 21.73, "pskd": 21.41}


def pskd_imagenet(arg: str | None = None) -> tuple[ml_collections.ConfigDict, str]:
  """`(config, model)` for `'<model>[,smoke]'` (model: resnet152 (default) or resnet50).

  A smoke run: 2 epochs on 2048 examples at 64 x 64 (eval: 73 -> 64), global batch 64, for a
  machine without accelerators; the recipe's shape, not its numbers.
  """
  model, smoke = parse_arg(arg, MODELS)
  model = model or MODELS[0]
  config = base_config()
  config.data.name = "imagenet2012"
  config.data.image_size = 224
  config.data.resize_size = 256
  config.data.crop_padding = 0        # the crop is the host's random-resized crop
  config.data.flip = 1
  config.data.color_jitter = 0.4
  config.data.lighting = 0.1
  config.data.mean, config.data.std = IMAGENET_MEAN_STD
  config.model.name = model
  config.model.init = "kaiming_fan_out"
  config.num_epochs = 90
  config.batch_size = 256
  config.eval_batch_size = 250        # divides ImageNet's 50,000 validation images
  config.log_every_steps = 500
  opt = config.optimizer
  opt.name, opt.learning_rate, opt.momentum, opt.nesterov = "sgd", 0.1, 0.9, False
  opt.weight_decay, opt.schedule = 1e-4, "multistep"
  opt.milestones, opt.decay_factor = (30, 60), 0.1
  apply_smoke(config, smoke)
  if smoke:
    config.data.image_size, config.data.resize_size = 64, 73
    config.batch_size = config.eval_batch_size = 64
  return config, model


def pskd_imagenet_config(arg: str | None, method: ml_collections.ConfigDict
                         ) -> ml_collections.ConfigDict:
  """`pskd_imagenet(arg)` training `method` (one of PUBLISHED_ERROR's); ResNet-152 runs carry
  the README's number as `config.published`."""
  config, model = pskd_imagenet(arg)
  config.method = method
  if model == "resnet152":
    error = PUBLISHED_ERROR[method.name]
    config.published = published_result(round(100 - error, 2), "best",
                                        f"PS-KD README, ResNet-152 (top-1 error {error})")
  return config
