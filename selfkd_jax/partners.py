"""Same-class partners for class-wise self-distillation (CS-KD): the data-side half of `cskd`.

Numpy only (no grain, no TFDS): build it once from your training labels, then draw each step's
partners on the host and feed their images as `batch['partner_image']`.

Every anchor example of a training step gets a partner drawn uniformly from the other training
examples of its class. The partner is a pure function of (seed, step, anchor index): no
iterator state, so resuming at any step and every host's slice of the global batch see exactly
the partners of the uninterrupted single-host run.

    partners = SameClassPartners(train_labels, seed=0)       # int [N], by dataset index
    partner_indices = partners.partners(anchor_indices, step)  # step: your host-side counter
    batch['partner_image'] = train_images[partner_indices]

Differences from the official sampler (alinlab/cs-kd `PairBatchSampler`, which draws
`random.choice(classwise_indices[y])` from Python's global RNG):

* by default the anchor itself is excluded (`exclude_self=True`): a partner equal to its
  anchor carries no class-wise signal. `exclude_self=False` draws from the whole class, anchor
  included, as the official code does.
* an example that is alone in its class (possible with `limit_train`) is its own partner: the
  only same-class example there is. `singleton_classes` lists those classes.
* the draw is a counter-based hash, not a stateful RNG, for exact resume.
"""
import numpy as np

_DOMAIN = np.uint64(0x5E1F_CD5C_0A55_9A17)  # Separates this stream from other uses of seed.


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic, no warnings)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def partner_hash(seed: int, step: int, indices: np.ndarray) -> np.ndarray:
  """uint64 hashes of (seed, step, index), one per index; uniform and independent in practice."""
  key = _splitmix64(np.array([int(seed)], np.uint64) ^ _DOMAIN)
  key = _splitmix64(key ^ np.array([int(step)], np.uint64))
  indices = np.asarray(indices)
  return _splitmix64(key ^ indices.astype(np.uint64).reshape(-1)).reshape(indices.shape)


class SameClassPartners:
  """Draws, for each anchor, a uniformly random same-class partner, keyed by (seed, step).

  Built once from the labels of the whole training split (`source_labels`). Examples are
  grouped by class (sorted, stable); a partner is `members[c][r]` with `r` from a SplitMix64
  hash of (seed, step, anchor index) reduced modulo the number of candidates (bias below
  2^-40 for any realistic class size).
  """

  def __init__(self, labels: np.ndarray, *, seed: int, exclude_self: bool = True):
    """Groups the examples by class.

    Args:
      labels: integer [N] labels of the training split, indexed by dataset index.
      seed: non-negative seed shared by all hosts (the data seed is a good choice).
      exclude_self: draw the partner among the other members of the class (default); False
        draws among all members, the anchor included, as the official code does. Either way an
        example alone in its class is its own partner.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not labels.size:
      raise ValueError(f"SameClassPartners needs labels of shape [N] with N > 0, got "
                      f"{labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ValueError(f"SameClassPartners needs non-negative integer labels, got dtype "
                      f"{labels.dtype} with minimum {labels.min()}")
    if int(seed) < 0:
      raise ValueError(f"SameClassPartners seed must be non-negative, got {seed}")
    self.seed = int(seed)
    self.exclude_self = bool(exclude_self)
    self.labels = labels.astype(np.int64)
    self._members = np.argsort(self.labels, kind="stable")  # dataset indices, grouped by class
    counts = np.bincount(self.labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self._count = counts[self.labels]  # class size of each example
    self._start = starts[self.labels]  # where its class begins in _members
    self._rank = np.empty_like(self._members)  # its position inside its class
    self._rank[self._members] = np.arange(len(self.labels)) - starts[self.labels[self._members]]
    self.singleton_classes = np.flatnonzero(counts == 1)

  def __len__(self) -> int:
    return len(self.labels)

  def partners(self, indices: np.ndarray, step: int) -> np.ndarray:
    """Partner dataset indices (int64, shape of `indices`) of the anchors `indices` at `step`.

    A pure function of (seed, step, index): the same anchor at the same step always gets the
    same partner, on every host and after any resume; a new step draws afresh.
    """
    indices = np.asarray(indices)
    if indices.size and (not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                         or indices.max() >= len(self)):
      raise ValueError(f"anchor indices must be integers in [0, {len(self)}); the partners were "
                      "built for another split")
    if int(step) < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    indices = indices.astype(np.int64)
    count, rank = self._count[indices], self._rank[indices]
    candidates = count - 1 if self.exclude_self else count
    candidates = np.maximum(candidates, 1)  # singleton class: itself (rank 0, no skip below)
    r = (partner_hash(self.seed, step, indices) % candidates.astype(np.uint64)).astype(np.int64)
    if self.exclude_self:
      r = np.where((count > 1) & (r >= rank), r + 1, r)  # skip the anchor's own slot
    return self._members[self._start[indices] + r]
