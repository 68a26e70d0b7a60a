"""CS-KD: class-wise self-knowledge distillation."""
import jax

from selfkd_jax.losses import classification


def cskd_loss(
    anchor_logits: jax.typing.ArrayLike,
    partner_logits: jax.typing.ArrayLike,
    temperature: jax.typing.ArrayLike,
) -> jax.Array:
  r"""The CS-KD distillation term: match a same-class partner's softened prediction.

  .. math::
    L = \tau^2 \cdot \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_p)/\tau) \,\|\,
        \mathrm{softmax}(z_a/\tau)\big),

  per example, where `z_p` are the logits of another training example of the same class
  (the data pipeline pairs them), computed with the same parameters. The gradient into
  `partner_logits` is stopped (`sg`). The method adds `CE(anchor) + λ·L`; official defaults
  `τ = 4`, `λ = 1`. This is `distillation_kl(anchor, partner, τ)`; the official code
  (`KLDivLoss(reduction='sum') / B`) gives the same per-example value.

  Args:
    anchor_logits: `[..., C]` logits of the anchor examples (receive the gradient).
    partner_logits: `[..., C]` logits of their same-class partners (stop-gradient).
    temperature: `τ > 0`, a Python float or (possibly traced) scalar.

  Returns:
    `[...]` float32 losses.

  References:
    Yun et al., Regularizing Class-wise Predictions via Self-knowledge Distillation,
    arXiv 2003.13964; code alinlab/cs-kd (`train.py`).
  """
  return classification.distillation_kl(anchor_logits, partner_logits, temperature)
