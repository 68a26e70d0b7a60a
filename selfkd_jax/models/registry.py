"""Model names → constructors: `get_model('resnet18', num_classes=100)`.

Names of the CIFAR-100 distillation benchmark (RepDistiller / mdistiller model zoo,
checked against their code, parameter counts equal to theirs): 'resnet20', 'resnet56',
'resnet8x4', 'resnet32x4' (`RepDistillerResNet`), 'vgg8', 'vgg13' (`VGG`, their
`vgg8_bn` / `vgg13_bn`), 'wrn40_2' and 'wrn16_2_nobias' (`WideResNet` without conv
biases, their `wrn_40_2` / `wrn_16_2`). 'wrn16_2' and 'wrn28_10' keep conv biases
(the meliketoy port's WRN, which configs written before use); hence the suffix of the
benchmark's bias-free WRN-16-2.

ImageNet: 'resnet50' and 'resnet152' (`BottleneckResNet`, torchvision's resnet50 /
resnet152 layer for layer; ResNet-152 is PS-KD's ImageNet network, whose official code
is `init='kaiming_fan_out'`).
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfkd_jax.models.cifar_resnet import RepDistillerResNet
from selfkd_jax.models.common import INIT_SCHEMES
from selfkd_jax.models.imagenet_resnet import BottleneckResNet
from selfkd_jax.models.lenet import LeNet5BN
from selfkd_jax.models.mlp import MLP
from selfkd_jax.models.resnet import CifarResNet, PreActResNet
from selfkd_jax.models.vgg import VGG, VGG_CONFIGS
from selfkd_jax.models.wide_resnet import WideResNet

# name → (class, the fields that define the architecture behind that name).
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    'mlp': (MLP, {}),
    'lenet5_bn': (LeNet5BN, {}),
    'resnet18': (CifarResNet, {'stage_sizes': (2, 2, 2, 2)}),
    'preact_resnet18': (PreActResNet, {'stage_sizes': (2, 2, 2, 2)}),
    'wrn16_2': (WideResNet, {'depth': 16, 'width': 2}),
    'wrn28_10': (WideResNet, {'depth': 28, 'width': 10}),
    # The CIFAR-100 distillation benchmark (RepDistiller / mdistiller).
    'wrn40_2': (WideResNet, {'depth': 40, 'width': 2, 'conv_bias': False}),
    'wrn16_2_nobias': (WideResNet, {'depth': 16, 'width': 2, 'conv_bias': False}),
    'resnet20': (RepDistillerResNet, {'depth': 20, 'widths': (16, 16, 32, 64)}),
    'resnet56': (RepDistillerResNet, {'depth': 56, 'widths': (16, 16, 32, 64)}),
    'resnet8x4': (RepDistillerResNet, {'depth': 8, 'widths': (32, 64, 128, 256)}),
    'resnet32x4': (RepDistillerResNet, {'depth': 32, 'widths': (32, 64, 128, 256)}),
    'vgg8': (VGG, {'stages': VGG_CONFIGS['S']}),
    'vgg13': (VGG, {'stages': VGG_CONFIGS['B']}),
    # ImageNet (224×224): torchvision's ResNet-50 / ResNet-152, PS-KD's ImageNet network.
    'resnet50': (BottleneckResNet, {'stage_sizes': (3, 4, 6, 3)}),
    'resnet152': (BottleneckResNet, {'stage_sizes': (3, 8, 36, 3)}),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# config.model.dtype -> the computation dtype (parameters stay float32).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def get_model(name: str, *, num_classes: int, dtype: Any = jnp.float32,
              bn_axis_name: str | None = None, init: str = 'flax',
              **kwargs: Any) -> nn.Module:
  """Builds the model registered under `name`.

  Args:
    name: one of `MODEL_NAMES`.
    num_classes: number of output classes.
    dtype: computation dtype (e.g. `jnp.bfloat16`); parameters stay float32.
    bn_axis_name: named axis (e.g. 'data') over which BatchNorm statistics are
      averaged in training under `shard_map`/`pmap`; None on a single device.
    init: initialisation scheme, one of `INIT_SCHEMES` ('flax', 'pytorch',
      'kaiming_fan_out'; see `selfkd_jax.models.common`).
    **kwargs: further fields of the model class (e.g. `dropout_rate=0.3` for the
      WRNs, `hidden_sizes=(512,)` for 'mlp', `layout='he2016'` for
      'preact_resnet18'). The fields that a name fixes (a WRN's depth and width, a
      ResNet's stage sizes) cannot be overridden.

  Returns:
    An unbound `flax.linen.Module`; `model.apply(variables, x, train=...)` returns
    the dict described in `selfkd_jax.models.common`.

  Raises:
    ValueError: for an unknown name or init, or an attempt to override a fixed field.
  """
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
  if init not in INIT_SCHEMES:
    raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INIT_SCHEMES)}")
  cls, fixed = _REGISTRY[name]
  clash = sorted(set(fixed) & set(kwargs))
  if clash:
    raise ValueError(
        f"model {name!r} fixes {', '.join(clash)}; pick another name instead")
  return cls(num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name,
             init_scheme=init,
             **fixed, **kwargs)


def model_from_config(model_config: Any, *, num_classes: int,
                      bn_axis_name: str | None = None) -> nn.Module:
  """The model a run's `config.model` (name, dtype, init, kwargs) describes.

  A config written before `init` existed (a saved workdir's, a teacher's) has no
  `model.init`: it gets 'flax', the initialisation those runs had.
  """
  return get_model(model_config.name, num_classes=num_classes,
                   dtype=COMPUTE_DTYPES[model_config.dtype], bn_axis_name=bn_axis_name,
                   init=model_config.get('init', 'flax'),
                   **dict(model_config.get('kwargs', {})))


def abstract_model(model: nn.Module, image_shape: Sequence[int]) -> tuple[Any, dict[str, Any]]:
  """`(variables, outputs)` of the model for one image, as ShapeDtypeStructs (no computation).

  One abstract trace of `init` and an eval-mode `apply`. The variables are in the trainer's
  layout: `{'params', 'batch_stats'}`, with an empty `batch_stats` for models without BatchNorm.
  """
  def init_and_apply(x):
    variables = model.init({'params': jax.random.PRNGKey(0)}, x, train=False)
    variables = {'params': variables['params'],
                 'batch_stats': variables.get('batch_stats', {})}
    return variables, model.apply(variables, x, train=False)
  return jax.eval_shape(init_and_apply,
                        jax.ShapeDtypeStruct((1, *tuple(image_shape)), jnp.float32))


def array_shapes(outputs: dict[str, Any]) -> dict[str, tuple]:
  """The shapes of the array entries of an (abstract) outputs dict."""
  return {key: tuple(value.shape) for key, value in outputs.items() if hasattr(value, 'shape')}


def output_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, tuple]:
  """Shapes of the model's array outputs for one image of `image_shape` (no computation)."""
  return array_shapes(abstract_model(model, image_shape)[1])


def variable_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> Any:
  """The model's variables as ShapeDtypeStructs (no computation), in the trainer's layout:
  `{'params', 'batch_stats'}` with an empty `batch_stats` for models without BatchNorm."""
  return abstract_model(model, image_shape)[0]
