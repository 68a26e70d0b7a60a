"""ReffAKD end to end: the autoencoder, its training and resume, the artifact, method and CLI."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from selfkd_jax import losses
from selfkd_jax import reffakd
from selfkd_jax.methods.reffakd import reffakd as reffakd_method
from selfkd_jax.methods.reffakd import soft_label_teacher
from selfkd_jax.models import autoencoder
from selfkd_jax.reffakd import autoencoder_training as training
from selfkd_jax.reffakd import build
from selfkd_jax.train import checkpoint
from numpy_reference import log_softmax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DN = ('NHWC', 'HWIO', 'NHWC')


# ------------------------------------------------------------------------------ autoencoder

def _hand_count(channels):
  """Weights + biases of conv C→12→24→48 and tconv 48→24→12→C, all 4×4."""
  pairs = [(channels, 12), (12, 24), (24, 48), (48, 24), (24, 12), (12, channels)]
  return sum(16 * a * b + b for a, b in pairs)


@pytest.mark.parametrize('channels, height, width', [(1, 32, 32), (3, 16, 24)])
def test_autoencoder_shapes_and_parameter_count(channels, height, width):
  model = autoencoder.ConvAutoencoder(channels=channels)
  images = jax.ShapeDtypeStruct((2, height, width, channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  reconstruction, embedding = jax.eval_shape(model.apply, variables, images)
  assert reconstruction.shape == (2, height, width, channels)
  assert embedding.shape == (2, 48 * (height // 8) * (width // 8))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  assert count == _hand_count(channels)
  assert count == {1: 46_585, 3: 47_355}[channels]
  params = variables['params']
  assert params['encoder_conv1']['kernel'].shape == (4, 4, channels, 12)
  assert params['encoder_conv3']['kernel'].shape == (4, 4, 24, 48)
  assert params['decoder_tconv1']['kernel'].shape == (4, 4, 24, 48)  # [kh, kw, out, in]
  assert params['decoder_tconv3']['kernel'].shape == (4, 4, channels, 12)


def test_autoencoder_refuses_sizes_that_do_not_divide_by_8():
  with pytest.raises(ValueError, match='divisible by 8'):
    autoencoder.ConvAutoencoder(channels=1).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def _torch_conv2d(x, kernel):
  """PyTorch Conv2d(k=4, stride=2, padding=1) by its definition, kernel [kh, kw, in, out]."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  b, h, w, _ = x.shape
  out = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
  for i in range(h // 2):
    for j in range(w // 2):
      window = padded[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4, :]
      out[:, i, j] = np.einsum('bhwc,hwco->bo', window, kernel)
  return out


def _torch_conv_transpose2d(x, kernel):
  """PyTorch ConvTranspose2d(k=4, stride=2, padding=1) by its definition.

  Input pixel (i, j) adds `x[i, j, c] * weight[c, o, kh, kw]` to output pixel
  (2i + kh − 1, 2j + kw − 1); PyTorch's weight[c, o, kh, kw] is our kernel[kh, kw, o, c].
  """
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h + 2, 2 * w + 2, kernel.shape[2]))  # one extra row/col each side
  for i in range(h):
    for j in range(w):
      for kh in range(4):
        for kw in range(4):
          out[:, 2 * i + kh, 2 * j + kw] += x[:, i, j] @ kernel[kh, kw].T
  return out[:, 1:-1, 1:-1]


def test_layers_compute_pytorchs_conv_and_transposed_conv():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 6, 3)).astype(np.float32)
  kernel = rng.standard_normal((4, 4, 3, 5)).astype(np.float32)
  np.testing.assert_allclose(autoencoder.conv_down(x, kernel), _torch_conv2d(x, kernel),
                             rtol=1e-5, atol=1e-5)
  code = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  up_kernel = rng.standard_normal((4, 4, 3, 5)).astype(np.float32)  # [kh, kw, out=3, in=5]
  np.testing.assert_allclose(autoencoder.conv_up(code, up_kernel),
                             _torch_conv_transpose2d(code, up_kernel), rtol=1e-5, atol=1e-5)
  # ... which is also XLA's transposed conv with the same kernel.
  reference = jax.lax.conv_transpose(code, up_kernel, (2, 2), ((2, 2), (2, 2)),
                                     dimension_numbers=DN, transpose_kernel=True)
  np.testing.assert_allclose(autoencoder.conv_up(code, up_kernel), reference, rtol=1e-5,
                             atol=1e-5)


def test_initialisation_is_pytorchs_uniform_with_its_fan_in():
  model = autoencoder.ConvAutoencoder(channels=1)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  params = variables['params']
  reconstruction, embedding = jax.jit(model.apply)(variables, images)
  assert bool(jnp.all((reconstruction > 0) & (reconstruction < 1)))  # the sigmoid
  assert bool(jnp.all(embedding >= 0)) and bool(jnp.any(embedding > 0))  # after a ReLU
  # PyTorch's fan-in: in·16 for Conv2d, out·16 for ConvTranspose2d.
  fan_ins = {'encoder_conv1': 16, 'encoder_conv2': 192, 'encoder_conv3': 384,
             'decoder_tconv1': 384, 'decoder_tconv2': 192, 'decoder_tconv3': 16}
  for name, fan_in in fan_ins.items():
    bound = fan_in**-0.5
    kernel = np.asarray(params[name]['kernel'])
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound  # uniform: the extremes are reached
    assert np.abs(np.asarray(params[name]['bias'])).max() <= bound


# ------------------------------------------------------------------------------ augmentation

def test_rotation_matches_pil_nearest():
  image_module = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
  rotate = jax.jit(training.rotate_nearest)
  mismatched = 0
  for angle in np.linspace(-15.0, 15.0, 13):
    ours = np.asarray(rotate(jnp.asarray(image[..., None]), angle))[..., 0]
    pil = np.asarray(image_module.fromarray(image).rotate(float(angle), image_module.NEAREST))
    mismatched += int(np.sum(ours != pil))
  # Only pixel centres that land on a pixel edge (rounding ties) may differ.
  assert mismatched <= 0.002 * 13 * image.size
  np.testing.assert_array_equal(np.asarray(rotate(jnp.asarray(image[..., None]), 90.0))[..., 0],
                                np.rot90(image))


def test_augmentation_depends_on_the_example_not_its_batch_slot():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
  indices = jnp.arange(6) + 100
  augment = jax.jit(lambda im, idx, e: training.augment_images(
      im, idx, key=jax.random.key(3), epoch=e, flip=True, rotation_degrees=15.0))
  forward = np.asarray(augment(images, indices, 0))
  reverse = np.asarray(augment(images[::-1], indices[::-1], 0))[::-1]
  np.testing.assert_array_equal(forward, reverse)
  assert not np.array_equal(forward, np.asarray(augment(images, indices, 1)))
  # One image under six indices: six draws, not one.
  same = np.asarray(augment(jnp.repeat(images[:1], 6, axis=0), indices, 0))
  assert len({row.tobytes() for row in same}) > 1


def test_resize_rounds_to_uint8_and_keeps_matching_sizes():
  images = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  resized = training.prepare_images(images, (32, 32))
  assert resized.shape == (3, 32, 32, 1) and resized.dtype == np.uint8
  assert training.prepare_images(resized, (32, 32)) is resized
  assert training.default_image_size(28, 28) == (32, 32)
  assert training.default_image_size(32, 64) == (32, 64)


# ------------------------------------------------------------------------------ training, resume

def _tiny_images(n=96):
  rng = np.random.default_rng(5)
  return rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


TINY_RECIPE = training.Recipe(epochs=2, batch_size=32, image_size=(8, 8))


def _train(workdir, recipe=TINY_RECIPE, seed=0):
  return training.train_autoencoder(_tiny_images(), mean=(0.3,), std=(0.3,), recipe=recipe,
                                    seed=seed, workdir=str(workdir), log=lambda m: None,
                                    progress=False)


def test_resume_after_a_kill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, monkeypatch):
  straight = _train(tmp_path / 'straight')
  assert len(straight.epoch_losses) == 2 and straight.resumed_from == 0

  real_save = checkpoint.Checkpointer.save

  def save_then_die(self, step, state):
    real_save(self, step, state)
    if step == 1:
      raise KeyboardInterrupt  # the process is killed right after the epoch-1 checkpoint

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    _train(tmp_path / 'killed')
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', real_save)
  resumed = _train(tmp_path / 'killed')

  assert resumed.resumed_from == 1 and len(resumed.epoch_losses) == 1
  assert resumed.epoch_losses[0] == straight.epoch_losses[1]
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The second epoch really trained: its parameters differ from the epoch-1 checkpoint.
  manager = ocp.CheckpointManager(str(tmp_path / 'killed' / 'checkpoints'))
  after_one = manager.restore(1, args=ocp.args.StandardRestore())['params']
  manager.close()
  assert not any(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(after_one), jax.tree.leaves(straight.params)))

  # A workdir holding another run is refused instead of silently mixed.
  with pytest.raises(reffakd.ArtifactError, match='seed'):
    _train(tmp_path / 'straight', seed=1)


def test_optimizer_schedule_is_the_notebooks_for_200_epochs():
  recipe = training.Recipe()
  assert recipe.milestone_epochs() == (60, 120, 160)
  assert training.Recipe(epochs=1).milestone_epochs() == ()
  schedule_tx = training.make_optimizer(recipe, steps_per_epoch=10)
  params = {'w': jnp.ones(())}
  state = schedule_tx.init(params)
  grads = {'w': jnp.zeros(())}
  # Zero gradient: the first update is −lr·wd·w = −0.1·5e-4.
  updates, _ = schedule_tx.update(grads, state, params)
  np.testing.assert_allclose(updates['w'], -0.1 * 5e-4, rtol=1e-6)


# ------------------------------------------------------------------------------ sample

def test_sample_per_class_is_seeded_distinct_and_balanced():
  labels = np.repeat(np.arange(4), 30)
  first = reffakd.sample_per_class(labels, 4, 10, seed=0)
  np.testing.assert_array_equal(first, reffakd.sample_per_class(labels, 4, 10, seed=0))
  assert not np.array_equal(first, reffakd.sample_per_class(labels, 4, 10, seed=1))
  assert len(np.unique(first)) == 40
  np.testing.assert_array_equal(np.bincount(labels[first]), [10, 10, 10, 10])
  with pytest.raises(reffakd.ArtifactError, match='fewer than'):
    reffakd.sample_per_class(labels, 4, 31, seed=0)


# ------------------------------------------------------------------------------ artifact

def _artifact(dataset='digits', num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  matrix = rng.uniform(-1, 1, (num_classes, num_classes)).astype(np.float32)
  matrix[0, 0] = np.float32(1 / 3)  # values without a short decimal form
  matrix[0, 1] = np.float32(1e-40)  # a subnormal
  return reffakd.make_artifact(matrix, dataset=dataset, samples_per_class=40, seed=seed,
                               diag_boost=0.008, ae_epochs=3)


def test_artifact_round_trip_is_bitwise(tmp_path):
  path = str(tmp_path / 'a.json')
  written = _artifact()
  reffakd.save_artifact(path, written)
  loaded = reffakd.load_artifact(path)
  assert loaded.similarity.dtype == np.float32
  assert loaded.similarity.tobytes() == written.similarity.tobytes()
  assert (loaded.dataset, loaded.num_classes, loaded.samples_per_class, loaded.seed,
          loaded.diag_boost, loaded.ae_epochs) == ('digits', 10, 40, 0, 0.008, 3)
  with open(path) as f:
    payload = json.load(f)
  expected = hashlib.sha256(written.similarity.astype('<f4').tobytes()).hexdigest()
  assert payload['sha256'] == loaded.sha256 == expected
  np.testing.assert_allclose(loaded.soft_labels().sum(axis=1), 1.0, rtol=1e-6)
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_edited_or_damaged_artifact_is_refused_in_one_line(tmp_path):
  path = str(tmp_path / 'a.json')
  reffakd.save_artifact(path, _artifact())
  with open(path) as f:
    payload = json.load(f)
  payload['similarity'][2][3] += 1e-3
  with open(path, 'w') as f:
    json.dump(payload, f)
  with pytest.raises(reffakd.ArtifactError, match='corrupted or was edited') as error:
    reffakd.load_artifact(path)
  assert '\n' not in str(error.value)

  with open(path, 'w') as f:
    f.write('{"format": 1, "similarity": [[0.1')
  with pytest.raises(reffakd.ArtifactError, match='not readable JSON'):
    reffakd.load_artifact(path)
  with pytest.raises(reffakd.ArtifactError, match='does not exist'):
    reffakd.load_artifact(str(tmp_path / 'missing.json'))


def test_ensure_artifact_refuses_another_dataset_or_class_count(tmp_path):
  path = str(tmp_path / 'a.json')
  reffakd.save_artifact(path, _artifact(dataset='digits', num_classes=10))
  with pytest.raises(reffakd.ArtifactError, match="'digits'.*'fashion_mnist'") as error:
    reffakd.ensure_artifact(path, dataset='fashion_mnist', num_classes=10, log=lambda m: None)
  assert '\n' not in str(error.value)
  with pytest.raises(reffakd.ArtifactError, match='10 classes.*has 100'):
    reffakd.ensure_artifact(path, dataset='digits', num_classes=100, log=lambda m: None)


def test_ensure_artifact_builds_once_then_reuses(tmp_path, monkeypatch):
  calls = []
  real_train = training.train_autoencoder

  def counting_train(*args, **kwargs):
    calls.append(1)
    return real_train(*args, **kwargs)

  monkeypatch.setattr(training, 'train_autoencoder', counting_train)
  path = str(tmp_path / 'digits.json')
  messages = []
  options = dict(dataset='digits', num_classes=10, epochs=1, samples_per_class=5,
                 limit_train=300, batch_size=64, log=messages.append, progress=False)
  first = reffakd.ensure_artifact(path, **options)
  assert calls == [1]
  assert any('does not exist' in m for m in messages)
  assert os.path.isdir(reffakd.default_workdir(path))
  mtime = os.stat(path).st_mtime_ns

  messages.clear()
  second = reffakd.ensure_artifact(path, **options)
  assert calls == [1] and not any('does not exist' in m for m in messages)
  assert os.stat(path).st_mtime_ns == mtime
  assert second.sha256 == first.sha256 and second.similarity.shape == (10, 10)
  assert (second.dataset, second.samples_per_class, second.ae_epochs) == ('digits', 5, 1)
  # δ of the digits (Fashion-MNIST's) is on the diagonal: the sample has pairs everywhere.
  assert second.diag_boost == 0.008 and np.all(np.isfinite(second.similarity))

  # A run whose dataset has another class count is refused before any training.
  with pytest.raises(reffakd.ArtifactError, match='10 classes but the run has 7'):
    reffakd.ensure_artifact(str(tmp_path / 'other.json'), **{**options, 'num_classes': 7})
  assert calls == [1]


# ------------------------------------------------------------------------------ command line

def _cli(*flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'selfkd_jax.reffakd', *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=240)


def test_cli_writes_a_valid_artifact(tmp_path):
  out = str(tmp_path / 'digits_reffakd.json')
  result = _cli('--dataset=digits', f'--out={out}', '--epochs=1', '--samples_per_class=5',
                '--limit_train=300', '--batch_size=64', '--seed=3', '--no_progress')
  assert result.returncode == 0, result.stderr
  loaded = reffakd.load_artifact(out)
  assert (loaded.dataset, loaded.num_classes, loaded.seed, loaded.ae_epochs,
          loaded.samples_per_class) == ('digits', 10, 3, 1, 5)
  assert loaded.autoencoder['embedding_dim'] == 48  # 8×8 digits: 48·1·1
  assert os.path.isdir(str(tmp_path / 'digits_reffakd_autoencoder' / 'checkpoints'))


@pytest.mark.parametrize('flags, message', [
    (['--dataset=digits', '--out=x.json', '--epochs=many'], "invalid int value: 'many'"),
    (['--dataset=digits', '--out=x.json', '--no_such_flag=1'], 'unrecognized arguments'),
    (['--out=x.json'], 'the following arguments are required: --dataset'),
    (['--dataset=no_such_dataset', '--out={tmp}/x.json'], "unknown dataset 'no_such_dataset'"),
    (['--dataset=digits', '--out={tmp}/x.json', '--samples_per_class=1'], 'must be >= 2'),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, flags, message):
  result = _cli(*[f.format(tmp=tmp_path) for f in flags])
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not os.path.exists(tmp_path / 'x.json')


# ------------------------------------------------------------------------------ method

def _soft_labels():
  similarity = np.random.default_rng(7).uniform(0, 1, (5, 5)).astype(np.float32)
  return np.asarray(losses.reffakd_soft_labels(similarity))


@pytest.mark.parametrize('variant', ['faithful', 'kldiv_mean'])
def test_reffakd_loss_matches_numpy(variant):
  soft = _soft_labels().astype(np.float64)
  rng = np.random.default_rng(8)
  logits = rng.standard_normal((6, 5)) * 3
  labels = np.array([0, 1, 2, 3, 4, 2])
  alpha, temperature = 0.3, 4.0
  method = reffakd_method(soft, alpha=alpha, temperature=temperature, variant=variant)
  loss, state, metrics = jax.jit(lambda z, y: method.update(
      method.init(), {'logits': z}, {'label': y}, step=0))(
          jnp.asarray(logits, jnp.float32), jnp.asarray(labels))

  ce = -log_softmax(logits)[np.arange(6), labels]
  targets = soft[labels]
  log_q = log_softmax(logits / temperature)
  if variant == 'faithful':
    # (1-α)·CE + α·T²·F.cross_entropy(z/T, t) per example
    soft_term = -np.sum(targets * log_q, axis=1)
  else:
    # nn.KLDivLoss() (mean over the B·C elements) per example: Σ_k t(log t − log q) / C
    soft_term = np.sum(targets * (np.log(targets) - log_q), axis=1) / 5
  expected = (1 - alpha) * ce + alpha * temperature**2 * soft_term
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['reffakd_ce'], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['reffakd_soft'], soft_term.mean(), rtol=1e-5)
  assert state == method.init()


def test_reffakd_checks_its_arguments():
  soft = _soft_labels()
  with pytest.raises(ValueError, match='sum to 1'):
    reffakd_method(np.ones((5, 5)))  # a similarity, not soft labels
  with pytest.raises(ValueError, match='variant'):
    reffakd_method(soft, variant='kl')
  with pytest.raises(ValueError, match='alpha'):
    reffakd_method(soft, alpha=1.5)
  with pytest.raises(ValueError, match='has 7 classes'):
    reffakd_method(soft).update((), {'logits': jnp.zeros((2, 7))}, {'label': jnp.zeros(2, int)},
                                step=0)


def test_soft_label_teacher_returns_the_label_rows():
  soft = _soft_labels()
  labels = jnp.array([[4, 0], [2, 2]])
  teacher = jax.jit(soft_label_teacher(soft))
  np.testing.assert_array_equal(teacher(labels), soft[np.asarray(labels)])
  as_logits = soft_label_teacher(soft, as_logits=True)(labels)
  np.testing.assert_allclose(jax.nn.softmax(as_logits, axis=-1), soft[np.asarray(labels)],
                             rtol=1e-5)
  # Usable as a KD teacher: Hinton's term against the pseudo-teacher is finite and positive.
  kd = losses.distillation_kl(jnp.zeros((2, 2, 5)), as_logits, 2.0)
  assert bool(jnp.all(jnp.isfinite(kd))) and bool(jnp.all(kd > 0))
