"""Pieces shared by every model: initialisers, BatchNorm, and the output dict.

Every model in this package returns the same dict, built by `classifier_outputs`:

- 'logits' [B, C] float32: `features @ classifier.kernel + classifier.bias`.
- 'features' [B, d] float32: the pooled penultimate features, exactly the input of
  the final Dense layer, which is always the submodule named 'classifier'.
- 'feature_map' [B, h, w, d'] float32: the last feature map before pooling.
- 'dense_logits' [B, h, w, C] float32, only when d' == d (the ResNets, WRNs and the
  MLP, whose feature map is the features at a single 1×1 position; not LeNet-5-BN):
  the same 'classifier' (same parameters) applied at every position of the feature
  map, `feature_map @ kernel + bias`. Zipf's label smoothing votes with them. Their
  spatial mean is 'logits' whenever the features are the mean-pooled feature map.
- 'stage_features': tuple of per-stage feature maps [B, h_i, w_i, d_i], in the
  computation dtype (they are large and most methods never read them).

Outputs a method does not read cost nothing: under `jit`, XLA removes every
computation whose result is never used (dead-code elimination), so 'dense_logits'
and 'stage_features' are only computed for the methods that consume them.

The classifier always computes in float32, whatever the model's `dtype`: it is a tiny
fraction of the FLOPs, softmax-based self-distillation targets are sensitive to
rounding of the logits, and it keeps `features @ kernel + bias == logits` exact in
every dtype, so a method can re-apply the classifier itself (BYOT-style heads) and
get the model's own numbers.

Initialisation: every model has a field `init_scheme` (`get_model(init=...)`,
`config.model.init`; a flax Module cannot have a field named `init`), one of
`INIT_SCHEMES`, and asks `conv_init` / `dense_init` for the initialisers of each conv
and Dense layer (`conv` and `dense` build the layers with them):

- 'flax' (default; the initialisation of every run made before the option existed):
  convs Kaiming-normal fan_out (`conv_kernel_init`), Dense layers flax's default
  (LeCun normal: a normal truncated at ±2σ, variance 1/fan_in), every bias zero.
- 'pytorch': PyTorch's own layer defaults, for convs and Linear layers alike:
  weight U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (`kaiming_uniform_(a=sqrt(5))`), bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = in_channels/groups · kh · kw for a
  conv, in_features for a Linear. What code without an init loop gets (PS-KD, CS-KD,
  Zipf's label smoothing, mdistiller's ShuffleNets).
- 'kaiming_fan_out': the init loop of the CIFAR distillation benchmarks
  (mdistiller / RepDistiller) and of BYOT: convs `kaiming_normal_(mode='fan_out',
  nonlinearity='relu')` = N(0, 2/fan_out), fan_out = out_channels · kh · kw; conv
  biases (where a conv has one) zero; Linear layers keep PyTorch's default (weight
  and bias uniform as in 'pytorch'). That is the common case, the loop of
  mdistiller's `ResNet` (resnet8x4 ... resnet110) and `ResNet18/50` (resnetv2.py), of
  BYOT's Multi_ResNet and of its journal version. Two architectures differ, and their
  classes apply the difference themselves under this scheme (see their docstrings):
  the WRN (`wrn.py`: the Linear bias is zeroed) and the VGG (`vgg.py`, like
  `mobilenetv2.py`: Linear weight N(0, 0.01²), bias zero).

BatchNorm starts at scale 1, bias 0 (and running mean 0, variance 1) in every scheme,
as PyTorch's and every official init loop.

Fans: flax's `variance_scaling` reads a conv kernel [kh, kw, in/groups, out] (HWIO)
as fan_in = kh·kw·in/groups and fan_out = kh·kw·out, which is PyTorch's
`_calculate_fan_in_and_fan_out` on the weight [out, in/groups, kh, kw]; for a
depthwise conv (groups = in = out) both give fan_in = kh·kw and fan_out = kh·kw·out.
A Dense kernel [in, out] has fan_in = in, as PyTorch's Linear weight [out, in].
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_SCHEMES: tuple[str, ...] = ('flax', 'pytorch', 'kaiming_fan_out')

# Kaiming-He normal, fan_out, untruncated: torchvision's ResNet initialisation
# (`kaiming_normal_(mode='fan_out', nonlinearity='relu')`): N(0, 2/fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# PyTorch's default weight init of Conv2d and Linear, `kaiming_uniform_(a=sqrt(5))`:
# gain² = 2/(1 + a²) = 1/3, bound = gain·sqrt(3/fan_in) = 1/sqrt(fan_in). flax's
# uniform variance scaling draws U(-sqrt(3·scale/fan_in), +...), so scale = 1/3.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

# flax's default Dense kernel init, LeCun normal: a normal truncated at ±2σ and
# rescaled so that the variance is 1/fan_in.
flax_dense_kernel_init = nn.linear.default_kernel_init

zeros_init = nn.initializers.zeros_init()


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default bias init of Conv2d and Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  `fan_in` is that of the layer's weight (a bias alone does not know it).
  """
  bound = 1.0 / fan_in**0.5 if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@dataclasses.dataclass(frozen=True)
class LayerInit:
  """The initialisers of one conv or Dense layer; `**layer_init.kwargs()` into flax."""
  kernel_init: Callable[..., jax.Array]
  bias_init: Callable[..., jax.Array]

  def kwargs(self) -> dict[str, Callable[..., jax.Array]]:
    return {'kernel_init': self.kernel_init, 'bias_init': self.bias_init}


def check_init(scheme: str) -> None:
  """Raises ValueError for a name not in `INIT_SCHEMES`."""
  if scheme not in INIT_SCHEMES:
    raise ValueError(f"unknown init {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")


def conv_init(scheme: str, *, in_features: int, kernel_size: int | Sequence[int],
              groups: int = 1) -> LayerInit:
  """Initialisers of a conv with `in_features` input channels under `scheme`.

  'flax' and 'kaiming_fan_out': kernel N(0, 2/fan_out), bias 0. 'pytorch': kernel and
  bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_features/groups · kh · kw.
  """
  check_init(scheme)
  if scheme == 'pytorch':
    kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    fan_in = in_features // groups
    for k in kernel:
      fan_in *= k
    return LayerInit(torch_kernel_init, torch_bias_init(fan_in))
  return LayerInit(conv_kernel_init, zeros_init)


def dense_init(scheme: str, *, in_features: int) -> LayerInit:
  """Initialisers of a Dense layer with `in_features` inputs under `scheme`.

  'flax': flax's default (LeCun normal kernel, bias 0). 'pytorch' and
  'kaiming_fan_out': PyTorch's Linear default, kernel and bias
  U(-1/sqrt(in_features), 1/sqrt(in_features)).
  """
  check_init(scheme)
  if scheme == 'flax':
    return LayerInit(flax_dense_kernel_init, zeros_init)
  return LayerInit(torch_kernel_init, torch_bias_init(in_features))



def conv(x: jnp.ndarray, features: int, kernel_size: int, *, strides: int = 1,
         padding: int | None = None, use_bias: bool = False, groups: int = 1,
         init: str = 'flax', dtype: Any = jnp.float32, name: str) -> jnp.ndarray:
  """A square conv applied to NHWC `x`, initialised by `conv_init(init, ...)`.

  `padding` zero pixels on every side (default `kernel_size // 2`, PyTorch's "same" for
  odd kernels). Explicit because flax's 'SAME' pads (0, 1) for a stride-2 conv on an
  even input, which samples different pixels than PyTorch's padding=1. Parameters are
  float32, the computation runs in `dtype`.
  """
  pad = kernel_size // 2 if padding is None else padding
  layer_init = conv_init(init, in_features=x.shape[-1], kernel_size=kernel_size,
                         groups=groups)
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=((pad, pad), (pad, pad)), use_bias=use_bias, feature_group_count=groups,
      dtype=dtype, param_dtype=jnp.float32, name=name, **layer_init.kwargs())(x)


def dense(x: jnp.ndarray, features: int, *, init: str = 'flax', dtype: Any = jnp.float32,
          name: str) -> jnp.ndarray:
  """A Dense layer (with bias) applied to `x`, initialised by `dense_init(init, ...)`."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  **dense_init(init, in_features=x.shape[-1]).kwargs())(x)

# PyTorch BatchNorm2d defaults: momentum 0.1 on the new value == 0.9 on the old one.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(*, train: bool, dtype: Any, axis_name: str | None,
               name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults and an optional cross-device axis.

  With `axis_name` set (e.g. 'data'), batch statistics in train mode are averaged
  over that named axis (`lax.pmean`), so that under `shard_map`/`pmap` they are the
  statistics of the global batch. Flax skips the reduction during `init`.

  Flax keeps the biased batch variance in the running average; PyTorch keeps the
  unbiased one (factor n/(n-1), n = B·h·w per device), a negligible difference.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=axis_name,
      name=name,
  )


def global_average_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the spatial axes of an NHWC map, accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def classifier_outputs(
    features: jnp.ndarray,
    feature_map: jnp.ndarray,
    stage_features: Sequence[jnp.ndarray],
    num_classes: int,
    init: str = 'flax',
    classifier_init: LayerInit | None = None,
) -> dict[str, Any]:
  """Applies the 'classifier' Dense layer and assembles the output dict.

  Must be called from inside a model's `@nn.compact` `__call__`, so that the Dense
  layer becomes that model's submodule 'classifier'. It is initialised by
  `classifier_init` if given (an architecture's own exception), else by
  `dense_init(init, ...)`.

  The one Dense instance is called twice, on the pooled features and, when the feature
  map has the classifier's input depth, on every position of the feature map
  ('dense_logits'); calling the same instance again reuses its parameters, so the
  parameter count does not change. When no method reads 'dense_logits', XLA drops
  that matmul under `jit` (dead-code elimination): it costs nothing.
  """
  features = features.astype(jnp.float32)
  feature_map = feature_map.astype(jnp.float32)
  if classifier_init is None:
    classifier_init = dense_init(init, in_features=features.shape[-1])
  classifier = nn.Dense(
      num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='classifier',
      **classifier_init.kwargs())
  outputs = {
      'logits': classifier(features).astype(jnp.float32),
      'features': features,
      'feature_map': feature_map,
      'stage_features': tuple(stage_features),
  }
  # Dense logits only mean something when the map lives in the classifier's input
  # space; LeNet-5-BN's last conv block (16 channels) feeds two more Dense layers.
  if feature_map.shape[-1] == features.shape[-1]:
    outputs['dense_logits'] = classifier(feature_map).astype(jnp.float32)
  return outputs
