"""The ReffAKD similarity artifact: one JSON file, written atomically, checked on load.

Format (JSON object, `format` = 1):

  similarity          [C][C] the class similarity matrix `S` (δ already on the diagonal), float32
                      values written as the shortest decimal that reads back to the same float32
  sha256              hex sha256 of the matrix as C-contiguous little-endian float32 bytes
  dataset             dataset name given to `data.load_splits`
  num_classes         C
  samples_per_class   images sampled per class for the similarity
  seed                seed of the autoencoder run and of the sample
  diag_boost          δ
  ae_epochs           epochs the autoencoder was trained
  autoencoder         the rest of the training recipe and the final reconstruction loss
                      (provenance only, not checked)

Why JSON rather than `.npz`: the matrix is small (10×10 for Fashion-MNIST, 200×200 for
Tiny-ImageNet, under 1 MB), a person can read and diff it, and reading it needs neither
pickle nor numpy's file format. A float32 value written through Python's `repr` of the
equal float64 reads back to exactly the same float32, so the round trip is bitwise; the
checksum over the float32 bytes proves it on every load. The checksum covers the matrix only:
it catches a corrupted or hand-edited matrix, not edited metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from selfkd_jax.train import run_log

FORMAT_VERSION = 1

_REQUIRED_KEYS = ('format', 'similarity', 'sha256', 'dataset', 'num_classes',
                  'samples_per_class', 'seed', 'diag_boost', 'ae_epochs')


class ArtifactError(ValueError):
  """The artifact is missing, unreadable, corrupted, or does not belong to this run.

  The message is one line naming the file and what to do, so a launcher can print it
  without a traceback.
  """


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A loaded (or freshly built) ReffAKD similarity artifact.

  Attributes:
    similarity: `[C, C]` float32 class similarity `S` (read-only array).
    dataset: dataset name.
    num_classes: `C`.
    samples_per_class: images per class the similarity was averaged over.
    seed: seed of the autoencoder training and of the sample.
    diag_boost: `δ` added to the diagonal.
    ae_epochs: autoencoder epochs.
    sha256: checksum of the matrix bytes (see `matrix_sha256`).
    autoencoder: provenance (recipe, final loss); not checked.
  """
  similarity: np.ndarray
  dataset: str
  num_classes: int
  samples_per_class: int
  seed: int
  diag_boost: float
  ae_epochs: int
  sha256: str
  autoencoder: dict[str, Any] = dataclasses.field(default_factory=dict)

  def soft_labels(self, temperature: float = 1.0):
    """`losses.reffakd_soft_labels(S, τ_s)`: the `[C, C]` pseudo-teacher rows (jax array)."""
    from selfkd_jax import losses  # pylint: disable=g-import-not-at-top  (keeps loading jax-free)
    return losses.reffakd_soft_labels(self.similarity, temperature)


def matrix_sha256(matrix: np.ndarray) -> str:
  """sha256 of `matrix` as C-contiguous little-endian float32 bytes (platform independent)."""
  return hashlib.sha256(np.ascontiguousarray(matrix, dtype='<f4').tobytes()).hexdigest()


def make_artifact(similarity, *, dataset: str, samples_per_class: int, seed: int,
                  diag_boost: float, ae_epochs: int,
                  autoencoder: dict[str, Any] | None = None) -> Artifact:
  """Wraps a similarity matrix with its metadata and checksum."""
  matrix = np.array(similarity, dtype=np.float32)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ArtifactError(f'the similarity must be a square [C, C] matrix, got shape '
                        f'{matrix.shape}')
  if not np.all(np.isfinite(matrix)):
    raise ArtifactError(f'the similarity matrix of {dataset!r} has non-finite entries; the '
                        'autoencoder diverged (try another --seed or fewer --epochs)')
  matrix.flags.writeable = False
  return Artifact(similarity=matrix, dataset=dataset, num_classes=int(matrix.shape[0]),
                  samples_per_class=int(samples_per_class), seed=int(seed),
                  diag_boost=float(diag_boost), ae_epochs=int(ae_epochs),
                  sha256=matrix_sha256(matrix), autoencoder=dict(autoencoder or {}))


def save_artifact(path: str, artifact: Artifact) -> None:
  """Writes `artifact` to `path` as JSON through a temporary file and a rename.

  A reader (or a run killed mid-write) never sees half a file: either the old file or the
  complete new one.
  """
  if matrix_sha256(artifact.similarity) != artifact.sha256:
    raise ArtifactError('refusing to save an artifact whose matrix does not match its sha256')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  payload = {
      'format': FORMAT_VERSION,
      # float() of a float32 is the equal float64; json writes its shortest repr, which reads
      # back to the same float64 and therefore to the same float32.
      'similarity': [[float(v) for v in row] for row in artifact.similarity],
      'sha256': artifact.sha256,
      'dataset': artifact.dataset,
      'num_classes': artifact.num_classes,
      'samples_per_class': artifact.samples_per_class,
      'seed': artifact.seed,
      'diag_boost': artifact.diag_boost,
      'ae_epochs': artifact.ae_epochs,
      'autoencoder': artifact.autoencoder,
  }
  run_log.write_json_atomic(path, payload)
  # The temporary file was created private (0600); give the artifact the usual permissions.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def load_artifact(path: str) -> Artifact:
  """Reads and verifies an artifact written by `save_artifact`.

  Raises:
    ArtifactError: (one line) the file is missing, is not an artifact, or its matrix does
      not match its sha256 (corrupted or edited).
  """
  if not os.path.exists(path):
    raise ArtifactError(f'ReffAKD artifact {path} does not exist; create it with '
                        f'`python -m selfkd_jax.reffakd --dataset=... --out={path}`')
  try:
    with open(path) as f:
      payload = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtifactError(f'ReffAKD artifact {path} is not readable JSON '
                        f'({type(e).__name__}: {_one_line(e)}); delete it to rebuild') from None
  if not isinstance(payload, dict) or any(k not in payload for k in _REQUIRED_KEYS):
    missing = [k for k in _REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
    raise ArtifactError(f'ReffAKD artifact {path} lacks {", ".join(missing)}; it is not an '
                        'artifact of this library (or is damaged); delete it to rebuild')
  if payload['format'] != FORMAT_VERSION:
    raise ArtifactError(f'ReffAKD artifact {path} has format {payload["format"]!r}, this '
                        f'library reads format {FORMAT_VERSION}; rebuild it')
  try:
    matrix = np.array(payload['similarity'], dtype=np.float32)
    num_classes = int(payload['num_classes'])
  except (TypeError, ValueError) as e:
    raise ArtifactError(f'ReffAKD artifact {path} holds a malformed matrix or class count '
                        f'({_one_line(e)}); delete it to rebuild') from None
  if matrix.shape != (num_classes, num_classes):
    raise ArtifactError(f'ReffAKD artifact {path}: the matrix has shape {matrix.shape} but '
                        f'num_classes is {num_classes}; delete it to rebuild')
  actual = matrix_sha256(matrix)
  if actual != payload['sha256']:
    raise ArtifactError(f'ReffAKD artifact {path} is corrupted or was edited: the sha256 of its '
                        f'matrix is {actual[:12]}…, the file records '
                        f'{str(payload["sha256"])[:12]}…; delete it to rebuild')
  matrix.flags.writeable = False
  return Artifact(similarity=matrix, dataset=str(payload['dataset']), num_classes=num_classes,
                  samples_per_class=int(payload['samples_per_class']),
                  seed=int(payload['seed']), diag_boost=float(payload['diag_boost']),
                  ae_epochs=int(payload['ae_epochs']), sha256=actual,
                  autoencoder=dict(payload.get('autoencoder') or {}))


def check_matches(artifact: Artifact, path: str, *, dataset: str, num_classes: int) -> None:
  """Raises ArtifactError (one line, both values) unless the artifact belongs to this run."""
  if artifact.dataset != dataset:
    raise ArtifactError(f'ReffAKD artifact {path} was made for dataset {artifact.dataset!r} but '
                        f'this run uses {dataset!r}; point to another artifact file or delete '
                        'it to rebuild')
  if artifact.num_classes != num_classes:
    raise ArtifactError(f'ReffAKD artifact {path} has {artifact.num_classes} classes but this '
                        f'run has {num_classes}; point to another artifact file or delete it to '
                        'rebuild')


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())
