"""ReffAKD: class similarity from autoencoder embeddings and the soft labels made from it."""
import jax
import jax.numpy as jnp

from selfkd_jax.losses import _common


def class_similarity(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_classes: int,
    diag_boost: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Average cosine similarity between the sampled images of every pair of classes.

  For every unordered pair of distinct sampled images `{i, j}` (no self-pairs), the cosine
  similarity of their flattened embeddings is added to the cell of their class pair: a
  cross-class pair to both `(a, b)` and `(b, a)`, a same-class pair once to `(c, c)`. Each
  cell is then divided by its number of pairs and `δ` is added to the diagonal:

  .. math::
    S_{ab} = \frac{1}{n_a n_b} \sum_{i \in a,\, j \in b} \cos(e_i, e_j) \ \ (a \ne b),
    \qquad
    S_{cc} = \frac{2}{n_c (n_c - 1)} \sum_{i < j;\ i, j \in c} \cos(e_i, e_j) + \delta .

  A cell with no pairs (a class with no samples, or a single sample on the diagonal) is 0
  before the boost. Samples whose label is outside `[0, C)` are ignored. Zero embeddings
  have cosine 0 with everything (`max(‖e‖, 1e-12)` normalisation).

  Computed without the `M × M` cosine matrix: with `u_c = Σ_{i∈c} ê_i` the sum of the
  normalised embeddings of class `c`, the block sum is `u_a·u_b`, and the same-class pair sum
  is `(‖u_c‖² − Σ_{i∈c} ‖ê_i‖²) / 2`. Memory is O(C·d) instead of O(M²). The matmuls use
  `Precision.HIGHEST`.

  Faithful defaults (ReffAKD notebooks): 40 images per class, `δ = 0.0225` (CIFAR-100,
  Tiny-ImageNet), `δ = 0.008` (Fashion-MNIST).

  Args:
    embeddings: `[M, ...]` embeddings of the sampled images (trailing dims are flattened).
    labels: `[M]` integer class ids (uneven counts per class are fine).
    num_classes: `C`, a static Python int.
    diag_boost: `δ`, added to the diagonal.

  Returns:
    `[C, C]` float32 symmetric similarity matrix.

  References:
    Doshi et al., ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
    arXiv 2404.09886; code JEKimLab/ReffAKD.
  """
  embeddings = _common.to_float(embeddings)
  embeddings = embeddings.reshape(embeddings.shape[0], -1)
  unit = _common.l2_normalize(embeddings)
  membership = jax.nn.one_hot(labels, num_classes, dtype=unit.dtype)  # [M, C]
  highest = jax.lax.Precision.HIGHEST
  class_sums = jnp.matmul(membership.T, unit, precision=highest)  # [C, d]
  block_sums = jnp.matmul(class_sums, class_sums.T, precision=highest)  # [C, C]
  self_sums = jnp.matmul(membership.T, jnp.sum(jnp.square(unit), axis=-1), precision=highest)

  counts = jnp.sum(membership, axis=0)
  pair_sums = block_sums.at[jnp.diag_indices(num_classes)].set(
      (jnp.diagonal(block_sums) - self_sums) / 2.0)
  pair_counts = jnp.outer(counts, counts)
  pair_counts = pair_counts.at[jnp.diag_indices(num_classes)].set(counts * (counts - 1) / 2.0)
  has_pairs = pair_counts > 0
  similarity = jnp.where(has_pairs, pair_sums / jnp.where(has_pairs, pair_counts, 1.0), 0.0)
  return similarity + _common.to_float(diag_boost) * jnp.eye(num_classes, dtype=similarity.dtype)


def reffakd_soft_labels(
    similarity: jax.typing.ArrayLike, temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
  r"""ReffAKD soft labels: a row-wise softmax of the class similarity matrix.

  .. math::
    S^{soft}_{c\cdot} = \mathrm{softmax}(S_{c\cdot} / \tau_s).

  `τ_s = 1` is faithful to the official notebooks; with non-negative embeddings the rows are
  then nearly uniform, and a lower `τ_s` sharpens them (a knob). Row `y` is the pseudo-teacher
  distribution of an example with label `y`.

  Args:
    similarity: `[C, C]` matrix from `class_similarity` (any `[..., C]` works).
    temperature: `τ_s > 0`; default 1.0.

  Returns:
    `[C, C]` float32 rows summing to 1.

  References:
    Doshi et al., ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
    arXiv 2404.09886.
  """
  similarity = _common.to_float(similarity)
  return jax.nn.softmax(similarity / _common.to_float(temperature), axis=-1)
