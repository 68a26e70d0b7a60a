"""LeNet-5 with BatchNorm: ReffAKD's Fashion-MNIST student."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from selfkd_jax.models import common


class LeNet5BN(nn.Module):
  """LeNet-5 with BatchNorm after each convolution, as in ReffAKD's Fashion-MNIST code.

  Layout (28×28×1 input):
    conv 6@5×5, padding 2 (28→28) → BN → ReLU → maxpool 2 (→14)
    → conv 16@5×5 valid (→10) → BN → ReLU → maxpool 2 (→5)
    → flatten 16·5·5 = 400 → Dense 120 → ReLU → Dense 84 → ReLU → 'classifier'.

  Checked against JEKimLab/ReffAKD `fashion_mnist/lenet_5_baseline.ipynb` and
  `fashion_mnist/tinySLG_distillation.ipynb` (the student). Their network:
    - BatchNorm only after the two convolutions; the Dense 120 and Dense 84 layers
      have no BatchNorm. We follow that (`fc_batchnorm=False`); `fc_batchnorm=True`
      adds BN before each of those two ReLUs.
    - Images are resized to 32×32 and the first conv is unpadded (32→28). We take
      28×28 input and pad the first conv by 2 (28→28), which gives the same shapes and
      parameter count; with 32×32 input set `conv1_padding=0`.
    - Their convs carry a bias, which the following BatchNorm cancels; ours do not
      (22 parameters fewer: 6 + 16).

  Parameters (10 classes, defaults): conv1 5·5·1·6 = 150, BN 2·6 = 12,
  conv2 5·5·6·16 = 2,400, BN 2·16 = 32, Dense 400·120+120 = 48,120,
  Dense 120·84+84 = 10,164, classifier 84·10+10 = 850; total 61,728
  (ReffAKD's PyTorch model: 61,750). `fc_batchnorm=True` adds 2·120 + 2·84 = 408.

  Initialisation by `init_scheme` (`common.INIT_SCHEMES`); the default 'flax' gives the convs
  Kaiming-normal fan_out (torchvision's), the Dense layers flax's default (LeCun
  normal, zero bias). ReffAKD's notebooks have no init loop: 'pytorch'.

  Attributes:
    num_classes: number of output classes.
    conv1_padding: symmetric zero padding of the first conv (2 for 28×28 input).
    fc_batchnorm: BatchNorm after the two hidden Dense layers (not in ReffAKD).
    dtype: computation dtype (parameters are float32).
    bn_axis_name: named axis over which BatchNorm statistics are averaged in training.
    init_scheme: initialisation scheme, one of `common.INIT_SCHEMES`.

  Returns from `__call__(x, train=...)` a dict:
    'logits' [B, C] float32; 'features' [B, 84] float32 (the classifier's input);
    'feature_map' [B, 5, 5, 16] float32 (the second conv block after its pool; its
    depth is not the classifier's input size, so dense per-position logits do not
    apply to this model); 'stage_features' = (conv block 1 [B, 14, 14, 6],
    conv block 2 [B, 5, 5, 16]), after their pools.

  References:
    LeCun et al., Gradient-based learning applied to document recognition, 1998.
    Doshi & Kim, ReffAKD: Resource-efficient autoencoder-based knowledge
    distillation, arXiv 2404.09886 (code: github.com/JEKimLab/ReffAKD).
  """
  num_classes: int
  conv1_padding: int = 2
  fc_batchnorm: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  init_scheme: str = 'flax'

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, Any]:
    common.check_init(self.init_scheme)

    def conv_block(x, features, padding, index):
      x = common.conv(x, features, 5, padding=padding, init=self.init_scheme, dtype=self.dtype,
                      name=f'conv{index}')
      x = common.batch_norm(train=train, dtype=self.dtype,
                            axis_name=self.bn_axis_name, name=f'bn{index}')(x)
      x = nn.relu(x)
      return nn.max_pool(x, (2, 2), strides=(2, 2))

    block1 = conv_block(x, 6, self.conv1_padding, 1)
    block2 = conv_block(block1, 16, 0, 2)

    h = block2.reshape((block2.shape[0], -1))
    for i, size in enumerate((120, 84)):
      h = common.dense(h, size, init=self.init_scheme, dtype=self.dtype, name=f'fc{i + 1}')
      if self.fc_batchnorm:
        h = common.batch_norm(train=train, dtype=self.dtype,
                              axis_name=self.bn_axis_name, name=f'fc{i + 1}_bn')(h)
      h = nn.relu(h)
    return common.classifier_outputs(
        h, block2, (block1, block2), self.num_classes, self.init_scheme)
