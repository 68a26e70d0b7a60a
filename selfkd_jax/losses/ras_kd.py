"""RAS-KD: the class relation matrix behind relation-aware label smoothing."""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def relation_matrix(
    prototypes: jax.typing.ArrayLike, temperature: jax.typing.ArrayLike) -> jax.Array:
  r"""Row-stochastic class relation matrix from class representative vectors.

  .. math::
    R_{cj} = \frac{\exp(\cos(V_c, V_j)/\tau_r)}{\sum_{l \ne c} \exp(\cos(V_c, V_l)/\tau_r)}
    \ \ (j \ne c), \qquad R_{cc} = 0,

  with `cos` computed on L2-normalised rows (`max(‖v‖, 1e-12)`, so an all-zero prototype
  gives cosine 0 instead of NaN). The diagonal is removed from the softmax exactly, every
  row sums to 1. The (reconstructed) default in docs/METHODS.md is `τ_r = 0.1`. The RAS-KD
  target is then `(1 − ε)·e_y + ε·R[y]`.

  Gradients flow into `prototypes` (the method stops them if its prototypes are a target).
  The `C × C` similarity uses `Precision.HIGHEST`: with `τ_r = 0.1` the reduced-precision
  default matmul of TPUs would perturb the logits by ~1e-2.

  Args:
    prototypes: `[C, d]` class representative vectors `V` (any leading batch shape
      `[..., C, d]` also works), float32 or bfloat16.
    temperature: `τ_r > 0`, a Python float or (possibly traced) scalar.

  Returns:
    `[C, C]` float32 relation rows with a zero diagonal.

  References:
    Kim & Woo, RAS-KD, PAKDD 2024, doi 10.1007/978-981-97-2253-2_16.
    Reconstruction: the full text is paywalled and there is no code; the formula is our
    reading of the abstract.
  """
  unit = _common.l2_normalize(_common.to_float(prototypes))
  cosine = jnp.einsum('...cd,...jd->...cj', unit, unit, precision=jax.lax.Precision.HIGHEST)
  num_classes = cosine.shape[-1]
  diagonal = jnp.eye(num_classes, dtype=bool)
  _, relations = _common.masked_log_softmax(cosine / _common.to_float(temperature), diagonal)
  return relations
