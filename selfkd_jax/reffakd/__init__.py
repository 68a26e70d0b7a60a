"""ReffAKD's similarity artifact: train the autoencoder, compare classes, store the matrix.

Command line (writes the artifact; resumes the autoencoder after a kill):

  python -m selfkd_jax.reffakd --dataset=fashion_mnist --out=artifacts/fashion_mnist.json

Python (the trainer):

  artifact = reffakd.ensure_artifact(path, dataset='fashion_mnist', num_classes=10, log=print)
  soft_labels = artifact.soft_labels()          # [C, C], losses.reffakd_soft_labels(S)
  method = methods.reffakd(soft_labels, ...)    # selfkd_jax.methods.reffakd

The artifact format, and why JSON: `artifact`. The autoencoder recipe and where it departs
from the official notebooks: `autoencoder_training`. The sample: `build`.

References:
  Doshi & Kim, ReffAKD: Resource-efficient Autoencoder-based Knowledge Distillation,
  arXiv 2404.09886 (code: github.com/JEKimLab/ReffAKD).
"""
from selfkd_jax.reffakd.artifact import Artifact
from selfkd_jax.reffakd.artifact import ArtifactError
from selfkd_jax.reffakd.artifact import load_artifact
from selfkd_jax.reffakd.artifact import make_artifact
from selfkd_jax.reffakd.artifact import matrix_sha256
from selfkd_jax.reffakd.artifact import save_artifact
from selfkd_jax.reffakd.build import BuildOptions
from selfkd_jax.reffakd.build import build_artifact
from selfkd_jax.reffakd.build import default_diag_boost
from selfkd_jax.reffakd.build import default_workdir
from selfkd_jax.reffakd.build import ensure_artifact
from selfkd_jax.reffakd.build import sample_per_class

__all__ = (
    'Artifact',
    'ArtifactError',
    'BuildOptions',
    'build_artifact',
    'default_diag_boost',
    'default_workdir',
    'ensure_artifact',
    'load_artifact',
    'make_artifact',
    'matrix_sha256',
    'sample_per_class',
    'save_artifact',
)
