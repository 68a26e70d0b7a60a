"""A multi-layer perceptron for small images (CPU demos, tests, digits / Fashion-MNIST)."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common


class MLP(nn.Module):
  """Flatten → [Dense(h) → ReLU] per hidden size → Dense 'classifier'.

  Parameters (defaults, 28×28×1 input, 10 classes): 784·256+256 = 200,960;
  256·256+256 = 65,792; classifier 256·10+10 = 2,570; total 269,322.

  Initialisation by `init_scheme` (`common.INIT_SCHEMES`): the default 'flax' gives
  every Dense layer flax's default (LeCun normal kernels, zero biases); 'pytorch' and
  'kaiming_fan_out' PyTorch's Linear default. The model has no BatchNorm;
  `bn_axis_name` exists only so that every model in the registry takes the same
  arguments.

  Attributes:
    num_classes: number of output classes.
    hidden_sizes: width of each hidden layer.
    dtype: computation dtype (parameters are float32).
    bn_axis_name: unused (no BatchNorm).
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, h_last] float32 (last hidden activation,
    the classifier's input); 'feature_map' = features[:, None, None, :];
    'stage_features' = each hidden activation as [B, 1, 1, h_i].
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    del train  # no dropout, no BatchNorm
    common.check_init(self.init_scheme)
    x = x.reshape((x.shape[0], -1))
    stage_features = []
    for i, size in enumerate(self.hidden_sizes):
      x = common.dense(x, size, init=self.init_scheme, dtype=self.dtype, name=f'hidden{i + 1}')
      x = nn.relu(x)
      stage_features.append(x[:, None, None, :])
    return common.classifier_outputs(
        x, x[:, None, None, :], stage_features, self.num_classes, self.init_scheme)
