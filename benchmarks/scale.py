"""ImageNet-size per-example state: memory, step time against N, and checkpoint cost.

PS-KD keeps one past prediction per training example: at ImageNet's N = 1,281,167 and C = 1000
that is 5.1 GB in float32 (2.6 GB in bfloat16), the reason to shard it by rows. This measures,
for each storage dtype and for N = 50,000 and N = 1,281,167 side by side, on the devices of
this process (4 fake CPU devices by default):

- `table_bytes_per_device`: the table's rows each device holds;
- `temp_bytes`: XLA's temporaries of the compiled train step (a copy of the table would show
  here; see `scatter_rows(after=)`);
- `step_ms` (median, p10, p90): one PS-KD train step of a small MLP at a fixed batch, timed
  alone; with the table updated in place it does not depend on N;
- `save_s`, `restore_s`, `checkpoint_bytes`: one verified checkpoint of the whole train state
  (`selfkd_jax.train.checkpoint.Checkpointer`, checksums included) and its restore;
- `peak_rss_bytes` after each of `--saves` train-then-save cycles: host memory must not creep.

The model is deliberately small (an MLP on 8x8x3 images): the point is the state, not the
network. Nothing is read from disk; the checkpoint goes to a temporary directory (or --tmp).

    python benchmarks/scale.py                       # 4 fake CPU devices, both dtypes
    python benchmarks/scale.py --dtypes=bfloat16 --num_examples=1281167

Results: `benchmarks/results/scale_<device kind>.json` (or --out) and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from selfkd_jax.methods import table_bytes  # pylint: disable=wrong-import-position
from selfkd_jax.train import parallel  # pylint: disable=wrong-import-position
from selfkd_jax.train.checkpoint import Checkpointer  # pylint: disable=wrong-import-position
from selfkd_jax.train.step import Augmentation  # pylint: disable=wrong-import-position

IMAGE_SHAPE = (8, 8, 3)


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def measure(*, num_examples: int, dtype: str, num_classes: int, batch_size: int, steps: int,
            saves: int, runner, workdir: str) -> dict:
  """One (N, dtype) case: compile, time `steps` steps, then `saves` save cycles, a restore."""
  # step_time.py's harness builds the step exactly as the trainer does.
  case = step_time.StepCase(
      "pskd", "float32", runner=runner, model_name="mlp", image_shape=IMAGE_SHAPE,
      num_classes=num_classes, num_examples=num_examples, batch_size=batch_size,
      augmentation=Augmentation(crop_padding=0, flip=False, mean=(0.5,) * 3, std=(0.25,) * 3),
      seed=0, method_overrides={"storage_dtype": dtype})
  batches = step_time.synthetic_batches(
      runner, num_batches=steps, batch_size=batch_size, image_shape=IMAGE_SHAPE,
      num_classes=num_classes, num_examples=num_examples, seed=1)
  case.compile(batches[0])
  case.run(batches[:2], record=False)
  case.run(batches, record=True)
  p10, median, p90 = case.percentiles_ms()

  # A run's steady state: every row written (zero rows would compress to nothing on disk).
  case.state = case.state.replace(method_state=_filled(case.state.method_state))
  checkpointer = Checkpointer(workdir, keep=1, log=lambda _: None)
  rss_after_saves, save_s = [], []
  for cycle in range(saves):
    case.run(batches[:2], record=False)
    start = time.perf_counter()
    checkpointer.save(cycle + 1, case.state)
    save_s.append(time.perf_counter() - start)
    rss_after_saves.append(_current_rss_bytes())
  step_dir = os.path.join(checkpointer.directory, str(saves))
  checkpoint_bytes = _directory_bytes(step_dir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          case.state)
  start = time.perf_counter()
  restored, _ = checkpointer.restore(abstract)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  checkpointer.close()
  del restored
  return {
      "num_examples": num_examples, "num_classes": num_classes, "storage_dtype": dtype,
      "num_devices": runner.num_devices, "batch_size": batch_size,
      "table_bytes_per_device": table_bytes(case.state.method_state, runner.num_devices),
      "temp_bytes": case.temp_bytes, "step_ms": median, "step_ms_p10": p10,
      "step_ms_p90": p90, "save_s": save_s, "restore_s": restore_s,
      "checkpoint_bytes": checkpoint_bytes, "rss_after_each_save_bytes": rss_after_saves,
      "peak_rss_bytes": _peak_rss_bytes(),
  }


def _filled(method_state):
  """`method_state` with every table row a random probability vector, built in place on the
  devices (no host copy of the table)."""

  def fill(rows):
    def make():
      logits = jax.random.normal(jax.random.PRNGKey(0), rows.shape, jax.numpy.float32)
      return jax.nn.softmax(logits, axis=-1).astype(rows.dtype)
    return jax.jit(make, out_shardings=rows.sharding)()

  return jax.tree.map(lambda x: fill(x) if x.ndim == 2 else x, method_state)


def markdown_table(records: list[dict]) -> str:
  gb = 1e9
  lines = ["| N | dtype | table/device GB | step temp MB | step ms (p10-p90) | save s | "
           "restore s | checkpoint GB | RSS after each save GB |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in records:
    rss = ", ".join(f"{b / gb:.2f}" for b in r["rss_after_each_save_bytes"])
    lines.append(
        f"| {r['num_examples']:,} | {r['storage_dtype']} | {r['table_bytes_per_device'] / gb:.3f} "
        f"| {r['temp_bytes'] / 1e6:.1f} | {r['step_ms']:.1f} ({r['step_ms_p10']:.1f}-"
        f"{r['step_ms_p90']:.1f}) | {np.median(r['save_s']):.1f} | {r['restore_s']:.1f} | "
        f"{r['checkpoint_bytes'] / gb:.2f} | {rss} |")
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_examples", default="50000,1281167")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--tmp", default=None, help="Where checkpoints go (default: a temp dir).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  devices = jax.devices()
  runner = parallel.make_runner("shard_map", devices)
  records = []
  for dtype in args.dtypes.split(","):
    for num_examples in (int(n) for n in args.num_examples.split(",")):
      workdir = tempfile.mkdtemp(prefix="selfkd_scale_", dir=args.tmp)
      try:
        record = measure(num_examples=num_examples, dtype=dtype, num_classes=args.num_classes,
                         batch_size=args.batch_size, steps=args.steps, saves=args.saves,
                         runner=runner, workdir=workdir)
      finally:
        shutil.rmtree(workdir, ignore_errors=True)
      records.append(record)
      print(markdown_table([record]).splitlines()[-1], flush=True)
  kind = devices[0].device_kind
  result = {"device_kind": kind, "platform": devices[0].platform,
            "num_devices": len(devices), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "records": records}
  out = args.out or os.path.join(step_time.RESULTS_DIR,
                                 f"scale_{step_time.device_slug(kind)}.json")
  step_time.write_results(result, out)
  print(markdown_table(records))
  print(f"results: {out}")
  return records


if __name__ == "__main__":
  main()
