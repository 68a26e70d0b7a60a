"""CS-KD: same-class partner sampling in the data pipeline and the class-wise distillation."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import data
from selfkd_jax import partners as pairs
from selfkd_jax.data import pairs as data_pairs
from selfkd_jax.methods.base import MethodHooks
from selfkd_jax.methods.cskd import cskd
from numpy_reference import log_softmax


def _labels(n=120, classes=6, seed=0):
  # Uneven class sizes, every class with at least 2 members.
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.arange(classes), np.arange(classes),
                           rng.integers(0, classes, n - 2 * classes)])
  return rng.permutation(labels)


def _source(n=120, classes=6):
  rng = np.random.default_rng(1)
  return data.ArraySource(rng.integers(0, 256, (n, 4, 3, 2), dtype=np.uint8),
                          _labels(n, classes))


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- partner sampling -----------------------------------------------------------------------


def test_partners_same_class_never_self_and_deterministic():
  labels = _labels()
  sampler = pairs.SameClassPartners(labels, seed=3)
  indices = np.arange(len(labels))
  for step in range(50):
    got = sampler.partners(indices, step)
    np.testing.assert_array_equal(labels[got], labels)
    assert not np.any(got == indices)
    np.testing.assert_array_equal(got, sampler.partners(indices, step))
    # Each anchor's partner depends on nothing but (seed, step, index): order/subset invariant.
    subset = indices[::-7]
    np.testing.assert_array_equal(sampler.partners(subset, step), got[subset])
  assert not np.array_equal(sampler.partners(indices, 0), sampler.partners(indices, 1))
  other = pairs.SameClassPartners(labels, seed=4)
  assert not np.array_equal(sampler.partners(indices, 0), other.partners(indices, 0))


@pytest.mark.parametrize("exclude_self", [True, False])
def test_partners_roughly_uniform_over_class(exclude_self):
  labels = np.array([0, 1, 0, 2, 0, 1, 0, 0, 2])  # class 0: indices 0, 2, 4, 6, 7
  sampler = pairs.SameClassPartners(labels, seed=0, exclude_self=exclude_self)
  steps = 4000
  draws = np.array([sampler.partners(np.array([4]), s)[0] for s in range(steps)])
  candidates = [0, 2, 6, 7] + ([] if exclude_self else [4])
  counts = np.array([np.sum(draws == c) for c in candidates])
  assert counts.sum() == steps  # only same-class candidates (and self only when allowed)
  expected = steps / len(candidates)
  assert np.all(np.abs(counts - expected) < 0.15 * expected), counts


def test_singleton_class_is_its_own_partner():
  labels = np.array([0, 0, 1, 0, 2, 2])
  sampler = pairs.SameClassPartners(labels, seed=0)
  np.testing.assert_array_equal(sampler.singleton_classes, [1])
  for step in range(20):
    got = sampler.partners(np.arange(6), step)
    assert got[2] == 2
    assert got[4] == 5 and got[5] == 4
    np.testing.assert_array_equal(labels[got], labels)


def test_partners_validation():
  with pytest.raises(ValueError, match="non-negative integer labels"):
    pairs.SameClassPartners(np.array([0.0, 1.0]), seed=0)
  with pytest.raises(ValueError, match="non-negative"):
    pairs.SameClassPartners(np.array([0, 1]), seed=-1)
  sampler = pairs.SameClassPartners(np.array([0, 0, 1, 1]), seed=0)
  with pytest.raises(ValueError, match="another split"):
    sampler.partners(np.array([4]), 0)


def test_source_labels_from_memory_or_chunked_reads():
  source = _source(n=50)
  assert data_pairs.source_labels(source) is source.labels

  class NoLabels:  # like TfdsSource: labels only through get_batch
    def __init__(self):
      self.calls = 0

    def __len__(self):
      return len(source)

    def get_batch(self, indices):
      self.calls += 1
      return source.get_batch(indices)

  wrapped = NoLabels()
  got = data_pairs.source_labels(wrapped, chunk_size=16)
  np.testing.assert_array_equal(got, source.labels)
  assert got.dtype == np.int32 and wrapped.calls == 4


def test_cached_labels_are_read_once_per_workdir(tmp_path):
  """A source that reads every record for its labels (ImageNet: ~140 GB) does so once; a
  resumed run reads the file. A stale or broken file is read again; labels held in memory
  need no file."""

  class ReadsRecords:  # like EncodedImageSource: labels only by reading every record
    def __init__(self, labels):
      self.values, self.calls = labels, 0

    def __len__(self):
      return len(self.values)

    def get_batch(self, indices):
      self.calls += 1
      return {"label": self.values[indices]}

  path = str(tmp_path / "train_labels.npy")
  labels = np.arange(40, dtype=np.int32) % 7
  first = ReadsRecords(labels)
  np.testing.assert_array_equal(data_pairs.cached_source_labels(first, path), labels)
  assert first.calls == 1 and os.listdir(tmp_path) == ["train_labels.npy"]
  resumed = ReadsRecords(labels)
  np.testing.assert_array_equal(data_pairs.cached_source_labels(resumed, path), labels)
  assert resumed.calls == 0
  longer = ReadsRecords(np.arange(41, dtype=np.int32) % 7)  # not this file's source
  assert len(data_pairs.cached_source_labels(longer, path)) == 41 and longer.calls == 1
  with open(path, "wb") as f:
    f.write(b"\x93NUMPY half a file")
  broken = ReadsRecords(labels)
  np.testing.assert_array_equal(data_pairs.cached_source_labels(broken, path), labels)
  assert broken.calls == 1 and np.load(path).shape == (40,)
  not_written = ReadsRecords(labels)
  data_pairs.cached_source_labels(not_written, str(tmp_path / "other.npy"), write=False)
  assert not (tmp_path / "other.npy").exists()
  in_memory = _source(n=50)
  assert data_pairs.cached_source_labels(in_memory, str(tmp_path / "mem.npy")) is in_memory.labels
  assert not (tmp_path / "mem.npy").exists()


# --- TrainBatches(partners=...) -------------------------------------------------------------


@pytest.mark.parametrize("reader", ["threads", "grain"])
def test_train_batches_pair_same_class(reader):
  source = _source()
  with data.TrainBatches(source, seed=2, global_batch_size=16, start_step=0, num_steps=40,
                         partners=True, reader=reader) as batches:
    got = list(batches)
  assert len(got) == 40
  sampler = pairs.SameClassPartners(source.labels, seed=2)
  for step, batch in enumerate(got):
    anchors = data.train_batch_indices(2, step, len(source), 16)
    np.testing.assert_array_equal(batch["index"], anchors)
    np.testing.assert_array_equal(batch["partner_index"], sampler.partners(anchors, step))
    np.testing.assert_array_equal(batch["partner_label"], batch["label"])
    np.testing.assert_array_equal(source.labels[batch["partner_index"]], batch["label"])
    assert not np.any(batch["partner_index"] == batch["index"])
    np.testing.assert_array_equal(batch["partner_image"], source.images[batch["partner_index"]])
    assert batch["partner_image"].dtype == np.uint8
    assert batch["partner_image"].shape == batch["image"].shape
    assert batch["partner_index"].dtype == np.int32


def test_train_batches_without_partners_unchanged():
  source = _source()
  kwargs = dict(seed=2, global_batch_size=16, start_step=0, num_steps=5)
  with data.TrainBatches(source, **kwargs) as plain, \
      data.TrainBatches(source, partners=True, **kwargs) as paired:
    for a, b in zip(plain, paired):
      assert set(a) == {"image", "label", "index"}
      _assert_batches_equal(a, {k: b[k] for k in a})


def test_train_batches_partners_resume_and_hosts():
  source = _source()
  kwargs = dict(seed=5, global_batch_size=16, num_steps=30, partners=True)
  with data.TrainBatches(source, start_step=0, **kwargs) as batches:
    full = list(batches)
  with data.TrainBatches(source, start_step=17, **kwargs) as batches:
    resumed = list(batches)
  assert len(resumed) == 13
  for a, b in zip(full[17:], resumed):
    _assert_batches_equal(a, b)
  hosts = []
  for process_index in range(2):
    with data.TrainBatches(source, start_step=0, process_index=process_index,
                           process_count=2, **kwargs) as batches:
      hosts.append(list(batches))
  for step, (a, b) in enumerate(zip(*hosts)):
    _assert_batches_equal({k: np.concatenate([a[k], b[k]]) for k in a}, full[step])


def test_train_batches_partner_object_and_errors():
  source = _source()
  sampler = pairs.SameClassPartners(source.labels, seed=9, exclude_self=False)
  with data.TrainBatches(source, seed=0, global_batch_size=16, start_step=3, num_steps=4,
                         partners=sampler) as batches:
    (batch,) = list(batches)
  np.testing.assert_array_equal(
      batch["partner_index"],
      sampler.partners(data.train_batch_indices(0, 3, len(source), 16), 3))
  wrong = pairs.SameClassPartners(source.labels[:60], seed=0)
  with pytest.raises(data.DataError, match="built for 60 examples"):
    data.TrainBatches(source, seed=0, global_batch_size=16, start_step=0, num_steps=4,
                      partners=wrong)


# --- the method -----------------------------------------------------------------------------


def _model(calls):
  def forward(variables, images, *, train):
    calls.append(train)
    return {"logits": images @ variables["params"]["w"]}
  return forward


def _problem(b=5, d=3, c=4):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
  x_anchor = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  x_partner = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, c, b), jnp.int32)
  return w, x_anchor, x_partner, labels


def _update(method, w, x_anchor, x_partner, labels, calls):
  hooks = MethodHooks(forward=_model(calls), variables={"params": {"w": w}}, images=x_anchor)
  batch = {"label": labels, "index": jnp.arange(len(labels)), "partner_image": x_partner}
  return method.update(method.init(), {"logits": x_anchor @ w}, batch, step=0,
                       hooks=hooks)


def test_cskd_loss_matches_numpy_and_partner_forward_in_train_mode():
  w, xa, xp, y = _problem()
  calls = []
  loss, state, metrics = _update(cskd(temperature=3.0, weight=0.7), w, xa, xp, y, calls)
  assert calls == [True]
  za, zp = np.asarray(xa @ w, np.float64), np.asarray(xp @ w, np.float64)
  ce = -log_softmax(za)[np.arange(len(y)), np.asarray(y)]
  log_p, log_q = log_softmax(zp / 3.0), log_softmax(za / 3.0)
  kl = 9.0 * (np.exp(log_p) * (log_p - log_q)).sum(-1)
  np.testing.assert_allclose(loss, ce + 0.7 * kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["cskd_distill"], kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["cskd_ce"], ce.mean(), rtol=1e-5)
  assert loss.shape == (5,) and state == cskd().init()


def test_cskd_partner_term_carries_no_gradient():
  w, xa, xp, y = _problem()
  method = cskd()
  partner_logits = xp @ w  # a constant

  def method_loss(w):
    return _update(method, w, xa, xp, y, [])[0].mean()

  def constant_partner_loss(w):
    za = xa @ w
    return (jax.nn.logsumexp(za, -1) - za[jnp.arange(len(y)), y]
            + 16.0 * jnp.sum(jax.nn.softmax(partner_logits / 4) * (
                jax.nn.log_softmax(partner_logits / 4) - jax.nn.log_softmax(za / 4)), -1)
            ).mean()

  def leaky_loss(w):  # what the loss would be if the gradient flowed into the partner
    za, zp = xa @ w, xp @ w
    return (jax.nn.logsumexp(za, -1) - za[jnp.arange(len(y)), y]
            + 16.0 * jnp.sum(jax.nn.softmax(zp / 4) * (
                jax.nn.log_softmax(zp / 4) - jax.nn.log_softmax(za / 4)), -1)).mean()

  got = jax.grad(method_loss)(w)
  np.testing.assert_allclose(got, jax.grad(constant_partner_loss)(w), rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, jax.grad(leaky_loss)(w), atol=1e-3)  # the check can tell
  np.testing.assert_allclose(jax.jit(jax.grad(method_loss))(w), got, rtol=1e-5, atol=1e-6)


def test_cskd_errors():
  w, xa, xp, y = _problem()
  method = cskd()
  hooks = MethodHooks(forward=_model([]), variables={"params": {"w": w}}, images=xa)
  with pytest.raises(ValueError, match=r"no 'partner_image'.*partners=True"):
    method.update((), {"logits": xa @ w}, {"label": y, "index": jnp.arange(5)}, step=0,
                  hooks=hooks)
  with pytest.raises(ValueError, match="hooks.forward"):
    method.update((), {"logits": xa @ w}, {"label": y, "partner_image": xp}, step=0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    cskd(temperature=0.0)
  with pytest.raises(ValueError, match="weight must be >= 0"):
    cskd(weight=-1.0)
