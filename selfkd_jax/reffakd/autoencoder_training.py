"""Training ReffAKD's autoencoder (resumable, bitwise deterministic) and embedding images with it.

The recipe follows JEKimLab/ReffAKD `fashion_mnist/autoencoder.ipynb` (the CIFAR-100 and
Tiny-ImageNet notebooks use the same optimizer and schedule):

* images resized to a multiple of 8 (Fashion-MNIST 28×28 → 32×32, bilinear, kept as uint8 as
  PIL does); random horizontal flip, then a random rotation in [-15°, 15°] (nearest
  neighbour, zero fill, as torchvision's `RandomRotation(15)` on a PIL image); then
  `(x/255 − mean)/std`;
* MSE between the sigmoid reconstruction and that same normalised image (`pixel_scale=
  'normalized'`, faithful: the sigmoid cannot reach the normalised background value, the
  notebooks train it that way anyway); `pixel_scale='unit'` uses `x/255` as input and target
  instead, the "[0, 1] images" reading of the method;
* SGD, lr 0.1, momentum 0.9, weight decay 5e-4 (PyTorch's: added to the gradient of every
  parameter before momentum), batch 128, 200 epochs, lr × 0.2 at epochs 60, 120 and 160.

Deviations, each for a reason:

* The milestones are kept as fractions (30 %, 60 %, 80 %) of the epochs, so a shorter run
  (`--epochs=20`) still anneals; for 200 epochs they are the notebook's 60/120/160.
* Each epoch drops the last partial batch (60000 % 128 = 96 images, a different 96 every
  epoch): every step then has the same shape, so one compiled step serves the whole run.
* The notebooks keep the weights of the epoch with the lowest reconstruction loss on the test
  split; we keep the last epoch's weights and never look at the test split.
* Data order and augmentation are pure functions of (seed, epoch, example index), not of
  PyTorch's global RNG, so a killed run resumes from its last epoch checkpoint and ends
  bitwise equal to an uninterrupted one (on the same machine).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfkd_jax.data import augment as augment_lib
from selfkd_jax.data import pipeline
from selfkd_jax.models.autoencoder import DOWNSAMPLING, ConvAutoencoder
from selfkd_jax.reffakd.artifact import ArtifactError
from selfkd_jax.train.checkpoint import Checkpointer

PIXEL_SCALES = ('normalized', 'unit')
RECIPE_FILE = 'recipe.json'


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the autoencoder is trained. Defaults: the official notebooks (see module docstring).

  Attributes:
    epochs: training epochs (200 in the notebooks).
    batch_size: images per step (128).
    learning_rate: initial SGD learning rate (0.1).
    momentum: SGD momentum (0.9).
    weight_decay: PyTorch-style L2 added to the gradient (5e-4).
    milestone_fractions: the lr is multiplied by `decay_factor` after these fractions of the
      epochs (rounded down to whole epochs; a milestone at epoch 0 is dropped).
    decay_factor: 0.2.
    flip: random horizontal flip.
    rotation_degrees: maximum angle of the random rotation; 0 disables it.
    pixel_scale: 'normalized' (faithful) or 'unit' (see module docstring).
    image_size: (H, W) the images are resized to; both multiples of 8.
  """
  epochs: int = 200
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  milestone_fractions: tuple[float, ...] = (0.3, 0.6, 0.8)
  decay_factor: float = 0.2
  flip: bool = True
  rotation_degrees: float = 15.0
  pixel_scale: str = 'normalized'
  image_size: tuple[int, int] = (32, 32)

  def milestone_epochs(self) -> tuple[int, ...]:
    return tuple(m for m in (int(f * self.epochs) for f in self.milestone_fractions) if m > 0)

  def check(self) -> None:
    """Raises ValueError (one line) on settings that cannot train."""
    if self.epochs < 1:
      raise ValueError(f'autoencoder epochs must be >= 1, got {self.epochs}')
    if self.batch_size < 1:
      raise ValueError(f'autoencoder batch size must be >= 1, got {self.batch_size}')
    if self.pixel_scale not in PIXEL_SCALES:
      raise ValueError(f'pixel_scale must be one of {", ".join(PIXEL_SCALES)}, got '
                       f'{self.pixel_scale!r}')
    if any(s < DOWNSAMPLING or s % DOWNSAMPLING for s in self.image_size):
      raise ValueError(f'image size must be a positive multiple of {DOWNSAMPLING}, got '
                       f'{self.image_size[0]}x{self.image_size[1]}')
    if self.rotation_degrees < 0:
      raise ValueError(f'rotation_degrees must be >= 0, got {self.rotation_degrees}')

  def to_json(self) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record['milestone_fractions'] = list(self.milestone_fractions)
    record['image_size'] = list(self.image_size)
    return record


def default_image_size(height: int, width: int) -> tuple[int, int]:
  """The smallest multiples of 8 not below (H, W): 28×28 → 32×32 (the notebooks' resize)."""
  return tuple(-(-s // DOWNSAMPLING) * DOWNSAMPLING for s in (height, width))


def prepare_images(images: np.ndarray, image_size: tuple[int, int],
                   chunk: int = 4096) -> np.ndarray:
  """Bilinearly resizes uint8 images [N, H, W, C] to `image_size`, rounded back to uint8.

  Rounding to uint8 mirrors torchvision's `Resize` on a PIL image, whose output is 8-bit
  before `ToTensor`. Images already of that size are returned unchanged.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}')
  if tuple(images.shape[1:3]) == tuple(image_size):
    return images
  target = tuple(image_size) + images.shape[3:]
  resize = jax.jit(lambda x: jnp.clip(jnp.round(jax.image.resize(
      x.astype(jnp.float32), (x.shape[0],) + target, 'bilinear')), 0, 255).astype(jnp.uint8))
  return np.concatenate([np.asarray(resize(images[i:i + chunk]))
                         for i in range(0, len(images), chunk)])


def to_pixels(images: jax.Array, mean, std, pixel_scale: str) -> jax.Array:
  """uint8 images → the autoencoder's input (and reconstruction target), float32."""
  if pixel_scale == 'normalized':
    return augment_lib.normalize(images, mean, std)
  return jnp.asarray(images).astype(jnp.float32) / 255.0


def rotate_nearest(image: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates one image [H, W, C] about its centre, nearest neighbour, zero outside.

  Like PIL's `Image.rotate(angle, NEAREST)` (what torchvision's `RandomRotation` calls): each
  output pixel centre is mapped back into the input and takes the pixel it lands in.
  """
  height, width = image.shape[:2]
  theta = jnp.deg2rad(degrees)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  y = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5 - height / 2.0
  x = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5 - width / 2.0
  source_x = cos * x - sin * y + width / 2.0
  source_y = sin * x + cos * y + height / 2.0
  column = jnp.floor(source_x).astype(jnp.int32)
  row = jnp.floor(source_y).astype(jnp.int32)
  inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
  taken = image[jnp.clip(row, 0, height - 1), jnp.clip(column, 0, width - 1)]
  return jnp.where(inside[..., None], taken, jnp.zeros((), image.dtype))


def augment_images(images: jax.Array, indices: jax.Array, *, key: jax.Array, epoch,
                   flip: bool, rotation_degrees: float) -> jax.Array:
  """Random flip then random rotation of uint8 images [B, H, W, C], keyed per example.

  Each example draws from `fold_in(fold_in(key, epoch), index)` (as `data.augment` does), so
  its augmentation depends on (key, epoch, dataset index) only.
  """
  epoch_key = jax.random.fold_in(key, epoch)

  def one(image, index):
    flip_key, angle_key = jax.random.split(jax.random.fold_in(epoch_key, index))
    if flip:
      image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
    if rotation_degrees > 0:
      angle = jax.random.uniform(angle_key, (), jnp.float32, -rotation_degrees,
                                 rotation_degrees)
      image = rotate_nearest(image, angle)
    return image

  return jax.vmap(one)(images, indices)


class AutoencoderState(NamedTuple):
  params: Any
  opt_state: Any


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with PyTorch-style weight decay and a step-wise multistep schedule."""
  schedule = optax.piecewise_constant_schedule(
      recipe.learning_rate,
      {m * steps_per_epoch: recipe.decay_factor for m in recipe.milestone_epochs()})
  return optax.chain(optax.add_decayed_weights(recipe.weight_decay),
                     optax.sgd(schedule, momentum=recipe.momentum or None))


@functools.lru_cache(maxsize=8)
def _compiled_functions(channels: int, recipe: Recipe, mean: tuple[float, ...],
                        std: tuple[float, ...], steps_per_epoch: int):
  """`(init_state(key), train_step)` for these settings, jitted once per process.

  Cached so that a run resumed in the same process (and every test run) reuses the compiled
  step instead of compiling it again; all randomness comes in through the arguments.

  `train_step(state, loss_sum, images, batch_indices [B], epoch, augment_key) ->
  (state, loss_sum)`. One step per call from a Python loop rather than a `lax.scan` over the
  epoch: on XLA's CPU backend the convolutions inside a scan ran 6x slower (300 vs 48 ms a
  step).
  """
  model = ConvAutoencoder(channels=channels)
  tx = make_optimizer(recipe, steps_per_epoch)
  height, width = recipe.image_size

  def init_state(key):
    params = model.init(key, jnp.zeros((1, height, width, channels), jnp.float32))['params']
    return AutoencoderState(params, tx.init(params))

  def train_step(state: AutoencoderState, loss_sum, images, batch_indices, epoch, augment_key):
    batch = images[batch_indices]
    if recipe.flip or recipe.rotation_degrees > 0:
      batch = augment_images(batch, batch_indices, key=augment_key, epoch=epoch,
                             flip=recipe.flip, rotation_degrees=recipe.rotation_degrees)
    pixels = to_pixels(batch, mean, std, recipe.pixel_scale)

    def loss_fn(params):
      reconstruction, _ = model.apply({'params': params}, pixels)
      return jnp.mean(jnp.square(reconstruction - pixels))  # nn.MSELoss(): mean over all.

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = AutoencoderState(optax.apply_updates(state.params, updates), opt_state)
    return new_state, loss_sum + loss

  return _compile_once(init_state, jax.random.key(0)), jax.jit(train_step)


@dataclasses.dataclass(frozen=True)
class TrainedAutoencoder:
  """What `train_autoencoder` returns.

  Attributes:
    params: the final parameters.
    epoch_losses: mean training MSE of every epoch run in this call (resumed epochs absent).
    final_loss: mean training MSE of the last epoch (None when the run was already complete).
    resumed_from: the number of epochs restored from the workdir (0 for a fresh run).
  """
  params: Any
  epoch_losses: tuple[float, ...]
  final_loss: float | None
  resumed_from: int


def train_autoencoder(images: np.ndarray, *, mean, std, recipe: Recipe, seed: int,
                      workdir: str, run_info: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print,
                      progress: bool = True) -> TrainedAutoencoder:
  """Trains the autoencoder on prepared uint8 images, checkpointing every epoch.

  On start it restores the latest epoch checkpoint in `<workdir>/checkpoints` (orbax, written
  atomically) and continues from there, so a killed run resumes where it stopped and ends
  with the same parameters, bit for bit, as one that was never interrupted. The recipe and
  `run_info` are stored in `<workdir>/recipe.json`; resuming with different ones is refused.

  Args:
    images: uint8 [N, H, W, C], already resized to `recipe.image_size` (`prepare_images`).
    mean: per-channel mean on the [0, 1] scale (for `pixel_scale='normalized'`).
    std: per-channel std on the [0, 1] scale.
    recipe: the training recipe.
    seed: seeds the initialisation, the data order and the augmentation.
    workdir: folder of the checkpoints.
    run_info: JSON-able facts that must also match on resume (dataset, number of images).
    log: receives one-line progress messages.
    progress: show a tqdm bar over the steps.

  Returns:
    The trained parameters and the losses of the epochs run.

  Raises:
    ArtifactError: the workdir holds a run with other settings, or the loss became NaN/inf.
  """
  recipe.check()
  images = np.asarray(images)
  num_images, height, width, channels = images.shape
  if (height, width) != tuple(recipe.image_size):
    raise ValueError(f'images are {height}x{width} but the recipe says {recipe.image_size}; '
                     'call prepare_images first')
  steps_per_epoch = pipeline.steps_per_epoch(num_images, recipe.batch_size)
  mean = tuple(float(m) for m in mean)
  std = tuple(float(s) for s in std)

  os.makedirs(workdir, exist_ok=True)
  settings = {'recipe': recipe.to_json(), 'seed': int(seed), 'num_images': int(num_images),
              'mean': list(mean), 'std': list(std), **(run_info or {})}
  checkpointer = Checkpointer(workdir, keep=2)
  try:
    _check_or_write_settings(workdir, settings, checkpointer.latest_step())

    init_state, train_step = _compiled_functions(channels, recipe, mean, std, steps_per_epoch)
    init_key, augment_key = jax.random.split(jax.random.key(seed))
    state = init_state(init_key)

    start_epoch = 0
    if checkpointer.latest_step() is not None:
      # The newest checkpoint that verifies (an older one when the latest is damaged).
      restored, start_epoch = checkpointer.restore(state)
      # Orbax hands back arrays committed to their device, the initial state is uncommitted:
      # the step would compile twice more for them (~6 s). The host round trip is exact.
      state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
      log(f'ReffAKD autoencoder: resuming from epoch {start_epoch}/{recipe.epochs} '
          f'({checkpointer.directory})')

    device_images = jnp.asarray(images)
    losses: list[float] = []
    bar = _progress_bar(recipe.epochs * steps_per_epoch, start_epoch * steps_per_epoch,
                        progress)
    start_time = time.perf_counter()
    try:
      for epoch in range(start_epoch, recipe.epochs):
        # The batches of `pipeline.train_batch_indices(seed, step, ...)` for the steps of this
        # epoch: its permutation cut into full batches.
        order = pipeline.epoch_permutation(seed, epoch, num_images)
        batch_indices = order[:steps_per_epoch * recipe.batch_size].reshape(
            steps_per_epoch, recipe.batch_size).astype(np.int32)
        loss_sum = jnp.zeros((), jnp.float32)
        for step_indices in batch_indices:
          state, loss_sum = train_step(state, loss_sum, device_images, step_indices, epoch,
                                       augment_key)
          if bar is not None:
            bar.update(1)
        loss = float(loss_sum) / steps_per_epoch
        if not math.isfinite(loss):
          raise ArtifactError(f'ReffAKD autoencoder: the reconstruction loss is {loss} at epoch '
                              f'{epoch + 1}; try another --seed or --pixel_scale=unit')
        checkpointer.save(epoch + 1, state)
        losses.append(loss)
        if bar is not None:
          bar.set_postfix(epoch=f'{epoch + 1}/{recipe.epochs}', mse=f'{loss:.4f}')
    finally:
      if bar is not None:
        bar.close()
    if losses:
      seconds = time.perf_counter() - start_time
      log(f'ReffAKD autoencoder: {len(losses)} epochs in {seconds:.1f} s, final train MSE '
          f'{losses[-1]:.5f}')
  finally:
    checkpointer.close()
  return TrainedAutoencoder(params=state.params, epoch_losses=tuple(losses),
                            final_loss=losses[-1] if losses else None,
                            resumed_from=start_epoch)


def embed(params, images: np.ndarray, *, mean, std, pixel_scale: str,
          batch_size: int = 512) -> np.ndarray:
  """Flattened encoder outputs `[N, 48·(H/8)·(W/8)]` of prepared uint8 images, no augmentation."""
  images = np.asarray(images)
  model = ConvAutoencoder(channels=images.shape[-1])
  mean = tuple(float(m) for m in mean)
  std = tuple(float(s) for s in std)

  @jax.jit
  def embed_batch(batch):
    _, embedding = model.apply({'params': params}, to_pixels(batch, mean, std, pixel_scale))
    return embedding

  return np.concatenate([np.asarray(embed_batch(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def _compile_once(fn, *example_args):
  """`fn` compiled for the shapes of `example_args`, without XLA's backend optimisations.

  For a function run once (the initialisation): eagerly, every initialiser op would compile
  on its own (~10 s on 2 CPU cores); one jitted program compiles in ~3.5 s with XLA's
  optimisations and ~0.6 s without them, which cost nothing for a program run once.
  Backends without that option get the default.
  """
  lowered = jax.jit(fn).lower(*example_args)
  try:
    return lowered.compile({'xla_backend_optimization_level': 0})
  except Exception:  # pylint: disable=broad-except  (an unknown option is only a slower compile)
    return lowered.compile()


def _check_or_write_settings(workdir: str, settings: dict[str, Any],
                             latest_step: int | None) -> None:
  path = os.path.join(workdir, RECIPE_FILE)
  # Round-trip through JSON so that tuples and lists compare equal.
  settings = json.loads(json.dumps(settings))
  if latest_step is not None and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != settings:
      differing = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
      raise ArtifactError(f'autoencoder workdir {workdir} holds a run with other settings '
                          f'({", ".join(differing)} differ); use another --workdir or delete it')
    return
  if latest_step is not None:
    raise ArtifactError(f'autoencoder workdir {workdir} has checkpoints but no {RECIPE_FILE}; '
                        'use another --workdir or delete it')
  from selfkd_jax.train import run_log  # pylint: disable=g-import-not-at-top
  run_log.write_json_atomic(path, settings)


def _progress_bar(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (only for the interactive bar)
  return tqdm(total=total, initial=initial, desc='ReffAKD autoencoder', unit='step',
              dynamic_ncols=True)
