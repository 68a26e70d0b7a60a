"""Flax Linen models. Each returns a dict: 'logits', 'features', 'feature_map',
'stage_features' (see `selfkd_jax.models.common`), with its final Dense layer named
'classifier'. Build them by name with `get_model`."""
from selfkd_jax.models import exits  # make_exits, for heads.ExitHead (BYOT, LSSKD)
from selfkd_jax.models.cifar_resnet import RepDistillerResNet
from selfkd_jax.models.common import INIT_SCHEMES
from selfkd_jax.models.imagenet_resnet import Bottleneck, BottleneckResNet
from selfkd_jax.models.lenet import LeNet5BN
from selfkd_jax.models.mlp import MLP
from selfkd_jax.models.registry import (COMPUTE_DTYPES, MODEL_NAMES, abstract_model,
                                        array_shapes, get_model, model_from_config,
                                        output_shapes, variable_shapes)
from selfkd_jax.models.resnet import BasicBlock, CifarResNet, PreActBlock, PreActResNet
from selfkd_jax.models.vgg import VGG
from selfkd_jax.models.wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    'COMPUTE_DTYPES', 'INIT_SCHEMES', 'MODEL_NAMES', 'abstract_model', 'array_shapes',
    'get_model', 'model_from_config', 'output_shapes', 'variable_shapes', 'MLP', 'LeNet5BN',
    'CifarResNet', 'PreActResNet', 'RepDistillerResNet', 'VGG',
    'WideResNet', 'BottleneckResNet', 'BasicBlock', 'PreActBlock', 'WideBasicBlock',
    'Bottleneck', 'exits',
]
