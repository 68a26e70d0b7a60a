"""Makes a ReffAKD similarity artifact.

  python -m selfkd_jax.reffakd --dataset=fashion_mnist --out=artifacts/fashion_mnist_reffakd.json

Trains the autoencoder (tqdm bar; a checkpoint every epoch in --workdir, by default
`<out without .json>_autoencoder/` next to the artifact; rerunning the same command after a
kill resumes from the last epoch), embeds `--samples_per_class` seeded training images per
class, and writes the class similarity with its metadata and sha256 atomically to --out
(replacing an existing file).

Cost: Fashion-MNIST at the faithful 200 epochs took 65 min on 2 shared CPU cores (19.5 s an
epoch of 468 steps; the time scales with --epochs).

Exit status: 0 written; 2 bad input (an unknown flag or dataset, a bad value, a workdir holding
another run), with one line on stderr; 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys


class _OneLineParser(argparse.ArgumentParser):
  """argparse that reports a usage error as one line (no usage block), exit status 2."""

  def error(self, message):
    sys.stderr.write(f'{self.prog}: error: {message}\n')
    sys.exit(2)


def _image_size(text: str) -> tuple[int, int]:
  """'32' or '32x32' → (32, 32)."""
  parts = text.lower().split('x')
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected H or HxW, got {text!r}') from None
  if len(size) == 1:
    size = size * 2
  if len(size) != 2:
    raise argparse.ArgumentTypeError(f'expected H or HxW, got {text!r}')
  return size


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = _OneLineParser(prog='python -m selfkd_jax.reffakd', allow_abbrev=False,
                          description='Train the ReffAKD autoencoder and write the class '
                          'similarity artifact.')
  parser.add_argument('--dataset', required=True,
                      help='a data.load_splits name: fashion_mnist, digits, mnist, a TFDS name')
  parser.add_argument('--out', required=True, help='the artifact file to write (.json)')
  parser.add_argument('--data_dir', default=None, help='dataset folder (IDX files or TFDS dir)')
  parser.add_argument('--epochs', type=int, default=None,
                      help='autoencoder epochs (default 200, as the official notebooks)')
  parser.add_argument('--seed', type=int, default=0, help='autoencoder and sample seed')
  parser.add_argument('--samples_per_class', type=int, default=40,
                      help='training images per class in the similarity (default 40)')
  parser.add_argument('--diag_boost', type=float, default=None,
                      help='δ added to the diagonal (default 0.008 Fashion-MNIST, 0.0225 '
                      'CIFAR-100/Tiny-ImageNet)')
  parser.add_argument('--workdir', default=None,
                      help='autoencoder checkpoints (default: <out without .json>_autoencoder)')
  parser.add_argument('--limit_train', type=int, default=None,
                      help='use only the first N training images (smoke runs)')
  parser.add_argument('--batch_size', type=int, default=128, help='autoencoder batch (128)')
  parser.add_argument('--image_size', type=_image_size, default=None,
                      help='resize to H or HxW, multiples of 8 (default: 28x28 → 32x32)')
  parser.add_argument('--pixel_scale', choices=('normalized', 'unit'), default='normalized',
                      help="autoencoder input/target: mean/std normalised (faithful) or [0, 1]")
  parser.add_argument('--no_progress', action='store_true', help='no tqdm bar')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Imported after parsing so that a bad flag fails in a fraction of a second.
  from selfkd_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from selfkd_jax.reffakd import build  # pylint: disable=g-import-not-at-top

  options = build.BuildOptions(
      seed=args.seed, samples_per_class=args.samples_per_class, diag_boost=args.diag_boost,
      epochs=args.epochs, data_dir=args.data_dir, limit_train=args.limit_train,
      batch_size=args.batch_size, image_size=args.image_size, pixel_scale=args.pixel_scale)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  try:
    build.build_artifact(args.out, dataset=args.dataset, options=options, workdir=args.workdir,
                         log=log, progress=not args.no_progress)
  except (DataError, ValueError) as e:  # ArtifactError is a ValueError.
    sys.stderr.write(f'error: {" ".join(str(e).split())}\n')
    return 2
  except KeyboardInterrupt:
    sys.stderr.write('interrupted; rerun the same command to resume the autoencoder\n')
    return 130
  print(args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
