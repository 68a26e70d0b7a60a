"""Zipf's label smoothing (Liang et al., ECCV 2022): CE plus a KL towards rank-based targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, logits_and_labels, stateless_init


def upsample_dense_logits(dense_logits: jax.Array, factor: int) -> jax.Array:
  """Bilinear ×`factor` upsampling of `[B, h, w, C]` dense logits, half-pixel centres.

  The convention of PyTorch's `F.interpolate(x, scale_factor=factor, mode='bilinear')`
  with `align_corners=False` (the default the official code relies on): output pixel
  `i` samples the input at `(i + 0.5) / factor - 0.5`, clamped to the border, so edge
  pixels repeat the edge value. `jax.image.resize` uses the same centres and
  renormalises the weights at the border, which gives the same clamping.

  Upsampling commutes with the classifier: each output pixel is a convex combination
  of input pixels (weights >= 0 summing to 1) and the classifier is affine, so
  `up(F) @ W + b == up(F @ W + b)`. Upsampling the C-channel logits therefore gives
  exactly the official code's votes (it upsamples the d-channel feature map, then
  applies the classifier) while the classifier runs at h·w positions instead of
  factor²·h·w, and the resize moves C channels instead of d: cheaper for every C.

  Args:
    dense_logits: `[B, h, w, C]` per-position logits.
    factor: integer scale; 1 returns the input unchanged.

  Returns:
    `[B, factor·h, factor·w, C]` float32.
  """
  dense_logits = jnp.asarray(dense_logits, jnp.float32)
  if factor == 1:
    return dense_logits
  batch, height, width, num_classes = dense_logits.shape
  return jax.image.resize(dense_logits, (batch, factor * height, factor * width, num_classes),
                          method="bilinear")


def zipf(*, weight: float = 0.1, dense: bool = True, upsample: int = 2) -> Method:
  r"""Zipf's label smoothing, stateless, one forward pass.

  .. math::
    L_i = \mathrm{CE}(z_i, y_i) + \lambda \cdot
          \mathrm{KL}\big(P_i \,\|\, \mathrm{softmax}(z_{i,k \ne y_i})\big)

  `P_i` is the Zipf's-law non-target distribution: the classes are ranked over all `C`
  (label included, ties share the minimum rank), weighted `1/rank`, the label dropped
  and the rest normalised (`losses.zipf_targets` / `losses.zipf_logit_targets`; the KL
  is `losses.zipf_loss`). The ranking scores:

  - `dense=True` (default, the paper's method): the classifier applied at every position
    of the last feature map (`outputs['dense_logits']`, [B, h, w, C]), upsampled
    bilinearly ×`upsample` (voting only), each position voting for its argmax class;
    scores = vote counts. CIFAR ResNet-18: 4×4 → 8×8 = 64 votes.
  - `dense=False`: the sample's own logits `z_i` (detached).

  Faithful to the official code (megvii-research/zipfls, `pytorch_zipfls/train.py`,
  `losses.py` `zipf_loss`/`gen_pdf`/`kl_loss`, `cifar_models/resnet.py`), checked there:
  the vote of every position counts, the label's included (votes scattered over all C
  classes, then `rankdata(-votes, method='min')`); the KL uses the student's final
  logits with the label removed before the softmax; CE is the plain separate term with
  weight 1 and `λ` multiplies the batch-mean KL with no other factor (no temperature,
  no `τ²`); upsampling is `F.upsample(featmap, scale_factor=2., mode='bilinear')` with
  `align_corners` left at its default False, applied to the feature map (we upsample
  the dense logits instead, identical; see `upsample_dense_logits`); the README runs
  CIFAR with `--upsample bilinear` and ImageNet/INAT without (`upsample=1` here).
  Not reproduced: the `--mask` option (KL only on correctly classified examples,
  normalised by their count; off in every published command) and the `rank_zipf`
  exponent (`--power`, default 1). The official code ranks on the host with scipy every
  step; here everything stays on device.

  Args:
    weight: `λ`, the weight of the KL term. Default 0.1 (CIFAR-100, ImageNet); the
      paper uses 1.0 on Tiny-ImageNet and INAT.
    dense: vote with dense logits (True) or rank the sample's logits (False).
    upsample: integer bilinear upsampling factor of the dense logits before voting;
      1 = none. Ignored when `dense=False`.

  Returns:
    A `Method`; `update` reads `outputs['logits']`, `outputs['dense_logits']` when
    `dense`, and `batch['label']`. Metrics: `zipf_loss`, the local batch mean of the KL.

  Raises:
    ValueError: at trace time, if `dense` and the model exposes no `'dense_logits'`.

  References:
    Liang, Li, Bing, Zhao, Tang, Lin, Fan. Efficient One Pass Self-distillation with
    Zipf's Label Smoothing. ECCV 2022. arXiv:2207.12980. Official code:
    megvii-research/zipfls.
  """
  if weight < 0:
    raise ValueError(f"zipf: weight must be >= 0, got {weight}")
  if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
    raise ValueError(f"zipf: upsample must be an integer >= 1, got {upsample!r}")

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name, hooks
    logits, labels = logits_and_labels("zipf", outputs, batch)
    if dense:
      if "dense_logits" not in outputs:
        raise ValueError("zipf(dense=True): the model exposes no 'dense_logits' (its feature "
                         "map does not feed the classifier); use zipf(dense=False).")
      # Votes are argmaxes: no gradient flows through them, so skip the resize's backward.
      dense_logits = jax.lax.stop_gradient(outputs["dense_logits"])
      if dense_logits.ndim != 4:
        raise ValueError(f"zipf: dense_logits must be [B, h, w, C], got {dense_logits.shape}")
      dense_logits = upsample_dense_logits(dense_logits, upsample)
      batch_size, num_classes = dense_logits.shape[0], dense_logits.shape[-1]
      targets = losses.zipf_targets(dense_logits.reshape(batch_size, -1, num_classes), labels)
    else:
      targets = losses.zipf_logit_targets(logits, labels)
    kl = losses.zipf_loss(logits, targets, labels)
    loss = losses.cross_entropy(logits, labels) + weight * kl
    return loss, state, {"zipf_loss": jnp.mean(kl)}

  return Method(stateless_init, update)
