#!/usr/bin/env bash
# Every benchmark on one GPU, in under 10 minutes, with no network: run from the repository
# root of a checkout whose Python packages (requirements-cuda.txt, and torch for the
# side-by-side) are installed.
#
#   bash benchmarks/gpu.sh            # results under benchmarks/results/, named by the device
#   OUT=/tmp/try bash benchmarks/gpu.sh   # elsewhere (required where JAX sees no GPU)
#   QUICK=1 OUT=/tmp/try bash benchmarks/gpu.sh   # every part at toy sizes: checks the script
#                                                  # itself on a CPU in a few minutes
#   PARTS=step,scale bash benchmarks/gpu.sh        # some parts only (step, torch, scale, train)
#
# 1. step_time.py at CIFAR scale (PreAct ResNet-18, 32x32x3, 100 classes, batch 128), fp32 and
#    bf16, ten methods spanning every kind of cost: time, XLA FLOPs and bytes, ratios to CE;
# 2. torch_side_by_side.py --device=cuda: our PS-KD step against the official-style PyTorch
#    step (skipped, with a line, if torch or its CUDA build is missing);
# 3. scale.py on the GPU: the ImageNet-size PS-KD table (1,281,167 x 1000), fp32 and bf16;
# 4. a short PS-KD training with launch.py on synthetic Fashion-MNIST-format data (the real
#    files when $FASHION_MNIST, default /usr/share/datasets/fashion-mnist, has them):
#    end-to-end images/s.
#
# Time (NVIDIA H200, JAX 0.11.2, 2026-12-01): step 266 s, side-by-side 41 s, scale 179 s,
# training 13 s. Each part has its own time limit, and none starts past DEADLINE_S (default
# 590 s from the start; a part's limit is cut to what is left), so one slow part costs the
# others' time, never the 10 minutes. The step benchmark stops compiling new cases after
# STEP_BUILD_S seconds (default 240; the part's limit is STEP_LIMIT_S, default 300) and times
# what it built, so a slow compiler costs methods, not the whole table.
#
# XLA's GPU autotuning made each PreAct ResNet-18 step take about 18 s to compile. With a
# compilation cache (JAX_COMPILATION_CACHE_DIR; a fresh temporary one unless set), JAX also
# keeps XLA's per-fusion autotuning results there, so the methods after the first few reuse the
# backbone's: on the H200, without the cache CE and BYOT (bf16) took 18.7 and 18.1 s; with it
# 14 of the 20 cases took 3.4-5.7 s and the slowest (LSSKD bf16) 19.8 s.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
DEADLINE_S=${DEADLINE_S:-590}
PARTS=${PARTS:-step,torch,scale,train}
for p in ${PARTS//,/ }; do
  case $p in step|torch|scale|train) ;;
    *) echo "gpu.sh: PARTS has '$p'; allowed: step, torch, scale, train (comma-separated)" >&2
       exit 2 ;;
  esac
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
PLATFORM=$($PY -c "import jax; print(jax.default_backend())") || exit 1
if [ "$PLATFORM" = cpu ] && [ "$OUT" = benchmarks/results ]; then
  # It would overwrite this CPU's committed results (results/cpu.json, scale_cpu.json) with
  # numbers from GPU-sized settings.
  echo "gpu.sh: JAX sees no GPU (backend cpu); to try the script on CPU, set OUT=<a scratch folder>" >&2
  exit 1
fi
if [ "${QUICK:-0}" = 1 ]; then
  STEP_ARGS=(--model=mlp --methods=ce,pskd --steps=2 --rounds=1 --warmup=1 --num_examples=1024)
  TORCH_ARGS=(--steps=2 --rounds=1 --warmup=1 --batch_size=16 --num_examples=256)
  SCALE_ARGS=(--num_examples=5000,20000 --num_classes=100 --steps=2 --saves=1)
  TRAIN_ARGS=(--config.num_epochs=1 --config.data.limit_train=1024)
else
  # Most telling first: a run cut short by STEP_BUILD_S loses the cheap target-only methods.
  STEP_ARGS=(--model=preact_resnet18 --methods=ce,pskd,lsskd,byot,kd,cskd,mrkd,ls,zipf,ras_kd
             --steps=10 --rounds=2 --warmup=3 --build_budget_s="${STEP_BUILD_S:-240}")
  TORCH_ARGS=(--steps=20 --rounds=2 --warmup=5)
  SCALE_ARGS=(--steps=20 --saves=2)
  TRAIN_ARGS=(--config.num_epochs=3)
fi
SLUG=$($PY -c "import jax, sys; sys.path.insert(0, 'benchmarks'); import step_time; print(step_time.device_slug(jax.devices()[0].device_kind))")
echo "device: $SLUG ($PLATFORM), results in $OUT"
$PY - <<'EOF'
import importlib.metadata as metadata, platform
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch")
found = []
for name in names:
  try:
    found.append(f"{name} {metadata.version(name)}")
  except metadata.PackageNotFoundError:
    pass
print(f"python {platform.python_version()}; " + "; ".join(found))
EOF
mkdir -p "$OUT"
status=0
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/jax_cache}

part() {  # part <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  local left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, DEADLINE_S=$DEADLINE_S s reached"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

# Ten methods that span the kinds of cost (targets only, extra forwards, heads, rotations).
want step && part "${STEP_LIMIT_S:-300}" "step time" $PY benchmarks/step_time.py \
    --batch_size=128 --dtypes=float32,bfloat16 "${STEP_ARGS[@]}" --out="$OUT/$SLUG.json"

TORCH_DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
if ! want torch; then
  :
elif [ "$TORCH_DEVICE" = cuda ] || { [ "${QUICK:-0}" = 1 ] && [ "$TORCH_DEVICE" = cpu ]; }; then
  part 100 "pytorch side by side" $PY benchmarks/torch_side_by_side.py --device="$TORCH_DEVICE" \
      "${TORCH_ARGS[@]}" --out="$OUT/torch_side_by_side_$SLUG.json"
else
  echo "== pytorch side by side: skipped (no torch with CUDA: pip install -r benchmarks/requirements-torch.txt)"
fi

want scale && part 240 "scale" $PY benchmarks/scale.py "${SCALE_ARGS[@]}" \
    --out="$OUT/scale_$SLUG.json"

if want train; then
DATA=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
WORK=$SCRATCH/train
mkdir -p "$WORK"
if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ]; then
  DATA="$WORK/data"
  $PY - "$DATA" <<'EOF'
import gzip, os, sys
import numpy as np
folder = sys.argv[1]; os.makedirs(folder)
rng = np.random.default_rng(0)
def write(name, magic, array):
  with gzip.open(os.path.join(folder, name), "wb") as f:
    f.write(magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape))
    f.write(array.tobytes())
for prefix, n in (("train", 60000), ("t10k", 10000)):
  write(f"{prefix}-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (n, 28, 28), np.uint8))
  write(f"{prefix}-labels-idx1-ubyte.gz", 2049, rng.integers(0, 10, n).astype(np.uint8))
EOF
  echo "(training on synthetic Fashion-MNIST-format data: the accuracy means nothing)"
fi
part 100 "pskd training" $PY launch.py --config=configs/fashion_mnist/pskd.py \
    --config.data.dir="$DATA" "${TRAIN_ARGS[@]}" --config.progress_bar=False \
    --workdir="$WORK/run"
cp "$WORK/run/results.json" "$OUT/fashion_mnist_pskd_train_$SLUG.json" 2>/dev/null || true
fi
exit $status
