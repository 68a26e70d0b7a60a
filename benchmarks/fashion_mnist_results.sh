#!/usr/bin/env bash
# Regenerates benchmarks/results/fashion_mnist/: every method's Fashion-MNIST config, 3 seeds.
#
#   bash benchmarks/fashion_mnist_results.sh            # runs what is missing, then reports
#   ROOT=/scratch/fmnist bash benchmarks/fashion_mnist_results.sh
#
# 1. The sweep trains every configs/fashion_mnist/*.py (one shared LeNet-5-BN recipe) for seeds
#    0, 1, 2 into $ROOT/<method>/seed<k>, skipping finished runs and resuming interrupted ones.
# 2. Each run's small JSON files (config, results, eval history, train metrics; no checkpoints)
#    are copied to benchmarks/results/fashion_mnist/runs/, the evidence behind the table.
# 3. The report command turns those into report.md, report.csv and the plots. Nothing in the
#    table is typed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-runs/fmnist}
PYTHON=${PYTHON:-python}
OUT=benchmarks/results/fashion_mnist
CONFIGS=$(ls configs/fashion_mnist/*.py | paste -sd, -)

"$PYTHON" -m selfkd_jax.sweep --configs="$CONFIGS" --seeds=0,1,2 --root="$ROOT"

for results in "$ROOT"/*/seed*/results.json; do
  run=$(dirname "$results")
  target="$OUT/runs/${run#"$ROOT"/}"
  mkdir -p "$target"
  cp "$run"/config.json "$run"/results.json "$run"/eval_history.json "$run"/metrics.jsonl \
     "$target"/
done

"$PYTHON" -m selfkd_jax.report "$OUT/runs" --out "$OUT" --benchmark benchmarks/results/cpu.json
