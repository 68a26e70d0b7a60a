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
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Kaiming-He normal, fan_out, untruncated: torchvision's ResNet initialisation
# (`kaiming_normal_(mode='fan_out', nonlinearity='relu')`). Used for every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

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
) -> dict[str, Any]:
  """Applies the 'classifier' Dense layer and assembles the output dict.

  Must be called from inside a model's `@nn.compact` `__call__`, so that the Dense
  layer becomes that model's submodule 'classifier'.

  The one Dense instance is called twice, on the pooled features and, when the feature
  map has the classifier's input depth, on every position of the feature map
  ('dense_logits'); calling the same instance again reuses its parameters, so the
  parameter count does not change. When no method reads 'dense_logits', XLA drops
  that matmul under `jit` (dead-code elimination): it costs nothing.
  """
  features = features.astype(jnp.float32)
  feature_map = feature_map.astype(jnp.float32)
  classifier = nn.Dense(
      num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='classifier')
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
