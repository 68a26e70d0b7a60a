"""Pure per-example loss primitives for teacher-free and self knowledge distillation.

Conventions shared by every function here:

* Per example: sums over the class (last) axis, never reduces over the batch; any leading
  batch shape (`[..., C]` logits, `[...]` integer labels). The trainer takes the mean.
* float32 or bfloat16 inputs; computed in float32 and returned as float32.
* jit-safe: temperatures, weights and epochs may be traced scalars; class counts are static.
* Every target built from the model itself is stop-gradient (teacher, partner, past
  predictions, Zipf targets); `soft_cross_entropy` is a plain primitive and does not stop
  gradients into its targets.
* Classes are masked out with `jnp.where` (exact in bf16), never with `z − 1000·mask`.

Nothing here imports a model, the trainer or the data pipeline. Formulas: `docs/METHODS.md`.
"""
from selfkd_jax.losses.classification import corrected_uniform
from selfkd_jax.losses.classification import cross_entropy
from selfkd_jax.losses.classification import distillation_kl
from selfkd_jax.losses.classification import smooth_labels
from selfkd_jax.losses.classification import soft_cross_entropy
from selfkd_jax.losses.classification import target_kl
from selfkd_jax.losses.cskd import cskd_loss
from selfkd_jax.losses.dkd import dkd_loss
from selfkd_jax.losses.pskd import pskd_alpha
from selfkd_jax.losses.pskd import pskd_targets
from selfkd_jax.losses.ras_kd import relation_matrix
from selfkd_jax.losses.reffakd import class_similarity
from selfkd_jax.losses.reffakd import reffakd_soft_labels
from selfkd_jax.losses.zipf import zipf_logit_targets
from selfkd_jax.losses.zipf import zipf_loss
from selfkd_jax.losses.zipf import zipf_targets

__all__ = (
    'class_similarity',
    'corrected_uniform',
    'cross_entropy',
    'cskd_loss',
    'distillation_kl',
    'dkd_loss',
    'pskd_alpha',
    'pskd_targets',
    'reffakd_soft_labels',
    'relation_matrix',
    'smooth_labels',
    'soft_cross_entropy',
    'target_kl',
    'zipf_logit_targets',
    'zipf_loss',
    'zipf_targets',
)
