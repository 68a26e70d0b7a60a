"""CS-KD: class-wise self-knowledge distillation from a same-class partner."""

from __future__ import annotations

import jax

from selfkd_jax import losses
from selfkd_jax.methods.base import Method, logits_and_labels, stateless_init

_NO_PARTNERS = ("cskd: the batch has no 'partner_image'; pair every anchor with a same-class "
                "example (your own loop: selfkd_jax.partners.SameClassPartners; the trainer: "
                "TrainBatches(..., partners=True)) and pass the partner images as the model "
                "sees them")


def cskd(*, temperature: float = 4.0, weight: float = 1.0) -> Method:
  r"""Class-wise self-knowledge distillation (CS-KD). Stateless.

  .. math::
    L_i = \mathrm{CE}(z_{a,i}, y_i) + \lambda\,\tau^2\,
          \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_{p,i})/\tau) \,\|\,
          \mathrm{softmax}(z_{a,i}/\tau)\big)

  where `z_a` are the anchors' logits (`outputs['logits']`) and `z_p` the logits of their
  same-class partners, computed by the same parameters in train mode without gradient:
  `hooks.forward(hooks.variables, batch['partner_image'], train=True)['logits']`.

  Needs from the caller:
    * `batch['partner_image']`: the partners' images, augmented and normalised like the
      anchors' (same shape as `hooks.images`). The data pipeline pairs the examples
      (`data.TrainBatches(..., partners=True)`, which also yields `partner_label`, equal to
      `label`, and `partner_index`).
    * `hooks.forward` and `hooks.variables`.
  Missing either raises a ValueError when the step is traced.

  Facts of the official code (alinlab/cs-kd, `train.py`, `datasets.py`):
    * the sampler yields B anchors followed by B partners (the loader batch is 2B); each
      partner is `random.choice(classwise_indices[y])`, which may be the anchor itself. Here
      the data pipeline excludes the anchor when its class has another member (see
      `data.pairs`; `SameClassPartners(..., exclude_self=False)` restores the official draw);
    * anchors and partners go through the network in two separate forward passes, the
      partner one under `torch.no_grad()` with the network in train mode (dropout on, BatchNorm
      normalising with the partner batch's own statistics). Here too, but the partner pass's
      BatchNorm running-statistics updates are dropped (`hooks.forward` leaves the caller's
      state alone), whereas PyTorch also folds them into the running averages;
    * `loss = mean CE(anchors) + lamda * KDLoss(T)`, `KDLoss = KLDiv(sum) / B * T^2`, i.e. the
      per-example value above averaged over the anchors; defaults `T = 4`, `lamda = 1`.
  Cost: two forward passes per step (one without backward), twice the images read.

  Args:
    temperature: `τ > 0`. Default 4.
    weight: `λ >= 0`, weight of the distillation term. Default 1.

  Returns:
    A `Method` whose metrics are `cskd_ce` and `cskd_distill` (local batch means).

  References:
    Yun, Park, Lee, Shin. Regularizing Class-wise Predictions via Self-knowledge Distillation.
    CVPR 2020, arXiv:2003.13964. Code: github.com/alinlab/cs-kd.
  """
  if not temperature > 0:
    raise ValueError(f"cskd: temperature must be > 0, got {temperature}")
  if not weight >= 0:
    raise ValueError(f"cskd: weight must be >= 0, got {weight}")

  def update(state, outputs, batch, *, step, axis_name=None, hooks=None):
    del step, axis_name
    if "partner_image" not in batch:
      raise ValueError(_NO_PARTNERS)
    if hooks is None or hooks.forward is None or hooks.variables is None:
      raise ValueError("cskd: needs hooks.forward and hooks.variables to run the partner "
                       "forward pass with the current parameters; pass "
                       "hooks=adapters.linen_hooks(...) or adapters.nnx_hooks(...)")
    logits, labels = logits_and_labels("cskd", outputs, batch)
    partner_outputs = hooks.forward(jax.lax.stop_gradient(hooks.variables),
                                    batch["partner_image"], train=True)
    partner_logits = jax.lax.stop_gradient(partner_outputs["logits"])
    ce = losses.cross_entropy(logits, labels)
    distill = losses.cskd_loss(logits, partner_logits, temperature)
    loss = ce + weight * distill
    return loss, state, {"cskd_ce": ce.mean(), "cskd_distill": distill.mean()}

  return Method(stateless_init, update)
