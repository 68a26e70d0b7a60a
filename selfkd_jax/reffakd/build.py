"""From a dataset name to the similarity artifact: train the autoencoder, sample, embed, compare.

The sample follows the official notebooks: `samples_per_class` (40) training images drawn
uniformly without replacement within every class, the class similarity averaged over every
pair of distinct sampled images (`losses.class_similarity`), δ added to the diagonal.
Deviations: the notebooks draw with Python's `random.sample` over the positions of a shuffled,
augmented pass of the train loader, so which images they embed, and how augmented, is not
reproducible; we draw from a seeded numpy generator over the dataset indices and embed the
images un-augmented (resized and normalised only, as the notebooks' test transform does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from selfkd_jax.reffakd import artifact as artifact_lib
from selfkd_jax.reffakd import autoencoder_training as training
from selfkd_jax.reffakd.artifact import Artifact, ArtifactError

# The notebooks' 200 autoencoder epochs (all three datasets).
FAITHFUL_EPOCHS = 200
FAITHFUL_SAMPLES_PER_CLASS = 40

# δ of the notebooks: 0.008 for Fashion-MNIST, 0.0225 for CIFAR-100 and Tiny-ImageNet. The
# other 10-class grayscale sets (no official value) take Fashion-MNIST's; anything else the
# value of the two larger datasets.
_DIAG_BOOSTS = {'fashion_mnist': 0.008, 'mnist': 0.008, 'digits': 0.008,
                'cifar100': 0.0225, 'tiny_imagenet': 0.0225}
_OTHER_DIAG_BOOST = 0.0225


def default_diag_boost(dataset: str) -> float:
  """δ for `dataset`: 0.008 Fashion-MNIST (and MNIST, digits), 0.0225 otherwise."""
  return _DIAG_BOOSTS.get(dataset, _OTHER_DIAG_BOOST)


def default_workdir(path: str) -> str:
  """The autoencoder's checkpoints next to the artifact: `<path without .json>_autoencoder`."""
  stem, _ = os.path.splitext(os.path.abspath(path))
  return stem + '_autoencoder'


def sample_per_class(labels: np.ndarray, num_classes: int, samples_per_class: int,
                     seed: int) -> np.ndarray:
  """Dataset indices of `samples_per_class` distinct examples of every class, sorted.

  Uniform without replacement within each class, from a numpy generator whose stream is
  separate from the data-order streams of the same seed (`spawn_key`), so the sample does
  not change with the number of autoencoder epochs.

  Raises:
    ArtifactError: a class has fewer than `samples_per_class` examples.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < samples_per_class:
      raise ArtifactError(f'class {c} has {len(members)} training examples, fewer than '
                          f'samples_per_class={samples_per_class}; lower --samples_per_class '
                          'or use more training data')
    chosen.append(rng.choice(members, samples_per_class, replace=False))
  return np.sort(np.concatenate(chosen))


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """Everything that decides an artifact, with the faithful defaults.

  Attributes:
    seed: seeds the autoencoder (init, data order, augmentation) and the sample.
    samples_per_class: images per class in the similarity (40).
    diag_boost: δ; None → `default_diag_boost(dataset)`.
    epochs: autoencoder epochs; None → 200.
    data_dir: dataset folder for `load_splits`.
    limit_train: keep only the first N training examples (smoke runs).
    batch_size: autoencoder batch size (128).
    image_size: (H, W) the images are resized to; None → the multiples of 8 at or above
      the dataset's size (28×28 → 32×32).
    pixel_scale: 'normalized' (faithful) or 'unit'.
  """
  seed: int = 0
  samples_per_class: int = FAITHFUL_SAMPLES_PER_CLASS
  diag_boost: float | None = None
  epochs: int | None = None
  data_dir: str | None = None
  limit_train: int | None = None
  batch_size: int = 128
  image_size: tuple[int, int] | None = None
  pixel_scale: str = 'normalized'

  def check(self) -> None:
    if self.samples_per_class < 2:
      raise ValueError(f'samples_per_class must be >= 2 (the diagonal averages pairs), got '
                       f'{self.samples_per_class}')
    if self.seed < 0:
      raise ValueError(f'seed must be >= 0, got {self.seed}')
    if self.epochs is not None and self.epochs < 1:
      raise ValueError(f'epochs must be >= 1, got {self.epochs}')


def build_artifact(path: str, *, dataset: str, options: BuildOptions = BuildOptions(),
                   workdir: str | None = None, num_classes: int | None = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> Artifact:
  """Trains the autoencoder (resuming from `workdir`), computes the similarity, writes `path`.

  Args:
    path: the artifact file to write (atomically).
    dataset: a `data.load_splits` name ('fashion_mnist', 'digits', a TFDS name, ...).
    options: see `BuildOptions`.
    workdir: autoencoder checkpoints; None → `default_workdir(path)`.
    num_classes: when given, the class count the dataset must have (checked before training).
    log: one-line messages.
    progress: tqdm bar over the autoencoder steps.

  Returns:
    The artifact written.

  Raises:
    DataError: the dataset cannot be loaded.
    ArtifactError, ValueError: bad options, a class too small for the sample, a diverged run,
      or a workdir holding another run.
  """
  from selfkd_jax import losses  # pylint: disable=g-import-not-at-top
  from selfkd_jax.data import sources  # pylint: disable=g-import-not-at-top

  options.check()
  train, _, info = sources.load_splits(dataset, data_dir=options.data_dir,
                                       limit_train=options.limit_train)
  if num_classes is not None and info.num_classes != num_classes:
    raise ArtifactError(f'dataset {dataset!r} has {info.num_classes} classes but the run has '
                        f'{num_classes}; no ReffAKD artifact can serve both')
  all_train = train.get_batch(np.arange(len(train)))
  image_size = tuple(options.image_size or training.default_image_size(*info.image_shape[:2]))
  recipe = training.Recipe(
      epochs=FAITHFUL_EPOCHS if options.epochs is None else options.epochs,
      batch_size=options.batch_size, pixel_scale=options.pixel_scale, image_size=image_size)
  recipe.check()
  diag_boost = default_diag_boost(dataset) if options.diag_boost is None else options.diag_boost
  # Check the sample before spending minutes on training.
  sample = sample_per_class(all_train['label'], info.num_classes, options.samples_per_class,
                            options.seed)

  images = training.prepare_images(all_train['image'], image_size)
  workdir = workdir or default_workdir(path)
  run_info = {'dataset': dataset, 'num_classes': info.num_classes}
  trained = training.train_autoencoder(
      images, mean=info.mean, std=info.std, recipe=recipe, seed=options.seed, workdir=workdir,
      run_info=run_info, log=log, progress=progress)

  embeddings = training.embed(trained.params, images[sample], mean=info.mean, std=info.std,
                              pixel_scale=recipe.pixel_scale)
  similarity = jax.jit(losses.class_similarity, static_argnums=2)(
      embeddings, all_train['label'][sample], info.num_classes, diag_boost)
  result = artifact_lib.make_artifact(
      np.asarray(similarity), dataset=dataset, samples_per_class=options.samples_per_class,
      seed=options.seed, diag_boost=diag_boost, ae_epochs=recipe.epochs,
      autoencoder={**recipe.to_json(), 'num_train': int(len(images)),
                   'embedding_dim': int(embeddings.shape[-1]),
                   # None when the workdir already held the finished run.
                   'final_train_mse': trained.final_loss, 'workdir': workdir})
  artifact_lib.save_artifact(path, result)
  log(f'ReffAKD artifact written: {path} ({info.num_classes} classes, '
      f'sha256 {result.sha256[:12]}…)')
  return result


def ensure_artifact(path: str, *, dataset: str, num_classes: int, data_dir: str | None = None,
                    seed: int = 0, samples_per_class: int = FAITHFUL_SAMPLES_PER_CLASS,
                    diag_boost: float | None = None, epochs: int | None = None,
                    workdir: str | None = None, limit_train: int | None = None,
                    batch_size: int = 128, image_size: tuple[int, int] | None = None,
                    pixel_scale: str = 'normalized', log: Callable[[str], None] = print,
                    progress: bool = True) -> Artifact:
  """The artifact at `path`: loaded when it exists, else built (and said so through `log`).

  An existing file is reused as it is, whatever the seed, epochs, δ or sample size it was
  made with (those are logged when they differ from the arguments); only a different dataset
  or class count is an error, since the matrix would then be wrong for the run.

  Args:
    path: the artifact file.
    dataset: the run's dataset name.
    num_classes: the run's number of classes.
    data_dir, seed, samples_per_class, diag_boost, epochs, limit_train, batch_size,
      image_size, pixel_scale: used only when the artifact is built (see `BuildOptions`).
    workdir: autoencoder checkpoints when built; None → `default_workdir(path)`.
    log: one-line messages (the trainer passes its logger).
    progress: tqdm bar while building.

  Returns:
    The verified artifact.

  Raises:
    ArtifactError: the file is corrupted, or belongs to another dataset or class count; or
      building failed (see `build_artifact`).
  """
  if os.path.exists(path):
    existing = artifact_lib.load_artifact(path)
    artifact_lib.check_matches(existing, path, dataset=dataset, num_classes=num_classes)
    requested = {'seed': seed, 'samples_per_class': samples_per_class, 'diag_boost': diag_boost,
                 'ae_epochs': epochs}
    differing = [f'{k}={getattr(existing, k)} (asked {v})' for k, v in requested.items()
                 if v is not None and getattr(existing, k) != v]
    if differing:
      log(f'ReffAKD artifact {path}: reusing it although it was made with '
          f'{", ".join(differing)}; delete it to rebuild')
    return existing

  log(f'ReffAKD artifact {path} does not exist: creating it (training the autoencoder on '
      f'{dataset})')
  options = BuildOptions(seed=seed, samples_per_class=samples_per_class, diag_boost=diag_boost,
                         epochs=epochs, data_dir=data_dir, limit_train=limit_train,
                         batch_size=batch_size, image_size=image_size, pixel_scale=pixel_scale)
  return build_artifact(path, dataset=dataset, options=options, workdir=workdir,
                        num_classes=num_classes, log=log, progress=progress)
