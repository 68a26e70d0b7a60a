#!/usr/bin/env bash
# Regenerates benchmarks/results/fashion_mnist/: every method's Fashion-MNIST config, 3 seeds.
#
#   bash benchmarks/fashion_mnist_results.sh      # trains what is missing, then reports
#
# 1. The sweep trains every configs/fashion_mnist/*.py (one shared LeNet-5-BN recipe) for seeds
#    0, 1, 2 into benchmarks/results/fashion_mnist/runs/<method>/seed<k>. Finished runs (their
#    config.json and results.json are committed) are skipped, interrupted ones resumed; the
#    checkpoints and TensorBoard files stay out of git (.gitignore).
# 2. The report command turns the runs into report.md, report.csv and the plots. Nothing in the
#    table is typed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=benchmarks/results/fashion_mnist
CONFIGS=$(ls configs/fashion_mnist/*.py | paste -sd, -)

"$PYTHON" -m selfkd_jax.sweep --configs="$CONFIGS" --seeds=0,1,2 --root="$OUT/runs"
"$PYTHON" -m selfkd_jax.report "$OUT/runs" --out "$OUT" --benchmark benchmarks/results/cpu.json
