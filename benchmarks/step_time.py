"""Train-step time of every method against plain cross-entropy, on one model, batch and device.

What it measures: the wall time of one call of the jitted data-parallel train step (augment ->
forward -> method update -> backward -> pmean -> optimizer), built from the same pieces the
trainer uses (`parallel.make_runner('shard_map', ...)`, `models.get_model`,
`method_factory.build_method`, `optim.make_optimizer`, `step.make_train_step`). Nothing is read
from disk: images are random uint8 of the requested shape, labels random, and the indices of the
timed batches are slices of one permutation of `num_examples` (so per-example tables are read and
written at scattered rows, as in training).

How: everything runs in one process. Each (method, dtype) is built, compiled and run for
`--warmup` steps first. Then, in each of `--rounds` rounds, the methods take turns (round-robin)
running `--steps` steps each, so slow phases of the machine hit all methods alike. Every step is
timed on its own: the step is dispatched and its output (new state and metrics) waited for with
`block_until_ready`, so each sample is one step's full latency and the reported `step_time_ms`
is the MEDIAN over all rounds (p10 and p90 alongside). Waiting every step removes the overlap of
host dispatch with device work that the trainer gets, which adds the (small, equal for all
methods) dispatch cost to every sample; timing windows of many steps would hide it but give only
a mean, not a per-step median. `ratio_to_ce` divides by CE's median for the same model, dtype
and batch. The benchmark only measures; it never asserts on speed.

Device-independent cost, from the same compiled executable that is timed: XLA's HLO cost
analysis (`compiled.cost_analysis()`: `flops` and `bytes_accessed` of one step, per device) and
its memory analysis (`temp_bytes`: the step's temporaries), with `flops_ratio_to_ce` and
`bytes_ratio_to_ce` against CE's for the same model, dtype and batch. Unlike the times they do
not vary from run to run, so they separate what a method computes from how fast a device runs it.

Methods with extra forward passes are timed with them: the teacher methods (KD, DKD, AEKT,
Tf-KD_self) with a teacher of the student's own architecture (random weights; its cost does
not depend on them), CS-KD with a partner image per example (`batch_size` anchors + as many
partners), MrKD with its snapshot forward. `batch_size` and images/s count anchors only.

GPU (CIFAR-100 scale):
  python benchmarks/step_time.py --model=preact_resnet18 --batch_size=128 \
      --dtypes=float32,bfloat16
CPU (small model):
  python benchmarks/step_time.py --model=lenet5_bn --image_shape=28,28,1 --num_classes=10 \
      --num_examples=60000 --batch_size=128 --dtypes=float32,bfloat16

Results go to `benchmarks/results/<device kind>.json` (or `--out`), and a markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Sequence

# Runs from a checkout without installing the package: the repository root goes on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from selfkd_jax import models
from selfkd_jax.methods import MrKDState, table_bytes
from selfkd_jax.train import default_config, method_factory, optim, parallel
from selfkd_jax.train.state import initial_state_fn
from selfkd_jax.train.step import Augmentation, make_train_step

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_slug(device_kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file name)."""
  return device_kind.strip().lower().replace(" ", "-")


class StepCase:
  """One (method, dtype): its compiled train step, its live state and its timed samples.

  Built from the trainer's own pieces; `scale.py` and `torch_side_by_side.py` time their JAX
  side with it too. `recipe`: the config whose optimizer and epoch count are used (default:
  `default_config.base_config()`); `method_overrides`: values of `config.method`.
  """

  def __init__(self, method_name, dtype_name, *, runner, model_name, image_shape, num_classes,
               num_examples, batch_size, augmentation, seed, method_overrides=None,
               recipe=None):
    self.method_name, self.dtype_name = method_name, dtype_name
    self.runner = runner
    config = recipe if recipe is not None else default_config.base_config()
    steps_per_epoch = math.ceil(num_examples / batch_size)
    backbone = models.get_model(model_name, num_classes=num_classes,
                                dtype=models.COMPUTE_DTYPES[dtype_name],
                                bn_axis_name=parallel.AXIS)
    eval_backbone = backbone.clone(bn_axis_name=None)
    tx, schedule = optim.make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
    context = method_factory.MethodContext(
        num_examples=num_examples, num_classes=num_classes, num_epochs=config.num_epochs,
        steps_per_epoch=steps_per_epoch,
        **method_factory.model_fields(eval_backbone, image_shape),
        # ReffAKD's cost does not depend on the matrix: time it with a stand-in.
        soft_labels=np.full((num_classes, num_classes), 1.0 / num_classes, np.float32))
    method_config = default_config.method_config(method_name, **(method_overrides or {}))
    if method_name == "zipf" and "dense_logits" not in context.output_shapes:
      method_config.dense = False  # e.g. LeNet-5-BN: no per-position logits to vote with
    setup = method_factory.setup_method(method_config, context, backbone, eval_backbone,
                                        bn_axis_name=parallel.AXIS)
    method, model, eval_model = setup.method, setup.model, setup.eval_model
    self.needs_partners = method_factory.needs_partners(method_config)
    # A network teacher of the student's own architecture (randomly initialised: its cost, one
    # eval-mode forward per step, does not depend on its weights).
    teacher_model, self.teacher_variables = None, {}
    if method_factory.needs_network_teacher(method_config):
      teacher_model = eval_backbone
      dummy = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
      self.teacher_variables = runner.put_frozen(
          eval_backbone.init(jax.random.PRNGKey(seed + 1), dummy, train=False))

    init = initial_state_fn(model=eval_model, method=method, tx=tx, image_shape=image_shape,
                            seed=seed, num_devices=runner.num_devices)
    self.state = runner.init_state(init)
    if isinstance(self.state.method_state, MrKDState):
      # Time MrKD's steady state: a snapshot present, so its forward runs (before the first
      # refresh, one epoch in, the step skips it). The snapshot's values do not change the cost.
      filled = self.state.method_state.num_filled
      self.state = self.state.replace(method_state=self.state.method_state._replace(
          num_filled=jax.device_put(np.ones((), np.int32), filled.sharding)))
    self.state_bytes_per_device = table_bytes(self.state.method_state, runner.num_devices)
    self.num_parameters = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    body = make_train_step(model=model, tx=tx, method=method, steps_per_epoch=steps_per_epoch,
                           augmentation=augmentation, schedule=schedule,
                           model_inputs=setup.model_inputs,
                           axis_name=parallel.AXIS, teacher_model=teacher_model)
    self.train_step = runner.compile_train(body, self.state)
    self.samples_ms: list[float] = []
    self.compile_s = None
    self.compiled_memory_bytes = None
    self.temp_bytes = None
    self.flops = None
    self.bytes_accessed = None
    self.peak_memory_bytes = None

  def compile(self, batch) -> None:
    """Compiles for `batch`'s shapes; records compile time and XLA's memory and cost analyses.

    The executable analysed is the one that is timed: the runner's jitted step, lowered and
    compiled once here, then called by `run`.
    """
    start = time.perf_counter()
    self.train_step = self.train_step.lower(self.state, batch, self.teacher_variables).compile()
    self.compile_s = time.perf_counter() - start
    analysis = self.train_step.memory_analysis()
    if analysis is not None:
      self.compiled_memory_bytes = int(
          analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
      self.temp_bytes = int(analysis.temp_size_in_bytes)
    self.flops, self.bytes_accessed = compiled_cost(self.train_step)

  def run(self, batches, record: bool) -> None:
    """One step per batch, each waited for; appends the per-step wall times if `record`."""
    for batch in batches:
      start = time.perf_counter()
      self.state, metrics = self.train_step(self.state, batch, self.teacher_variables)
      jax.block_until_ready((self.state, metrics))
      if record:
        self.samples_ms.append((time.perf_counter() - start) * 1e3)

  def percentiles_ms(self) -> tuple[float, float, float]:
    """p10, median and p90 of the recorded step times."""
    return percentiles_ms(self.samples_ms)


def percentiles_ms(samples_ms) -> tuple[float, float, float]:
  """p10, median and p90 of `samples_ms`."""
  return tuple(float(x) for x in np.percentile(samples_ms, [10, 50, 90]))


def compiled_cost(compiled) -> tuple[float | None, float | None]:
  """(FLOPs, bytes accessed) of one call of `compiled`, from XLA's HLO cost analysis.

  `Compiled.cost_analysis()` returns a dict, or (some JAX versions and backends) a list of one
  dict per program (the step is one program: the first is read); None or an empty result (a backend without the analysis) gives
  (None, None), and a missing key gives None for that value. With several devices the program
  analysed is the per-device (SPMD) one, so the numbers are per device.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # a backend may not implement it
    return None, None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None, None

  def value(key):
    number = analysis.get(key)
    return float(number) if number is not None and number >= 0 else None

  return value("flops"), value("bytes accessed")


def _ratio(value, reference):
  """value / reference, or None where either is unknown (or the reference is 0)."""
  if value is None or not reference:
    return None
  return value / reference


def synthetic_host_batches(*, num_batches, batch_size, image_shape, num_classes, num_examples,
                           seed, partners=False) -> list[dict[str, np.ndarray]]:
  """Host batches: random uint8 images and labels, indices from one permutation.

  With `partners` (CS-KD), each batch also carries a partner per example, as the pipeline's
  `TrainBatches(partners=True)` does: another random image with the same label.
  """
  rng = np.random.default_rng(seed)
  permutation = rng.permutation(num_examples).astype(np.int32)
  batches = []
  for i in range(num_batches):
    start = (i * batch_size) % (num_examples - batch_size + 1)
    host = {
        "image": rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
        "index": permutation[start:start + batch_size],
    }
    if partners:
      host.update(partner_image=rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
                  partner_label=host["label"],
                  partner_index=np.roll(permutation, 1)[start:start + batch_size])
    batches.append(host)
  return batches


def synthetic_batches(runner, **kwargs):
  """`synthetic_host_batches(**kwargs)`, resident on the runner's devices."""
  return [runner.put_batch(host) for host in synthetic_host_batches(**kwargs)]


def write_results(records, out: str) -> None:
  """Writes `records` as indented JSON to `out` (creating its folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(records, f, indent=1)
    f.write("\n")


def _peak_memory_bytes(device) -> int | None:
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def run_benchmark(*, methods: Sequence[str] = method_factory.METHOD_NAMES,
                  model: str = "preact_resnet18", image_shape: Sequence[int] = (32, 32, 3),
                  num_classes: int = 100, num_examples: int = 50_000, batch_size: int = 128,
                  dtypes: Sequence[str] = ("float32", "bfloat16"), steps: int = 50,
                  warmup: int = 5, rounds: int = 3, num_devices: int = 0,
                  crop_padding: int = 4, flip: bool = True, seed: int = 0,
                  build_budget_s: float = 0.0, log=None) -> list[dict[str, Any]]:
  """Times the train step of each (method, dtype); returns one record per pair timed.

  'ce' is always timed (added if missing) since every ratio is relative to it. The records
  follow the order of `dtypes`, then `methods`.

  Cases are built (compiled and warmed up) method by method, every dtype of a method in turn, so
  a run cut short still has both dtypes of the methods it reached. `build_budget_s` > 0 stops
  building new cases (CE's excepted) once that many seconds have gone on building (a GPU run
  on a fixed lease: XLA's autotuning can make each compile take tens of seconds); the cases
  built so far are timed, the rest are logged as skipped. A case that fails to build is logged
  with its error and skipped too; the caller sees the missing pairs in the records.
  """
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  methods = list(dict.fromkeys(["ce", *methods]))
  unknown = ([m for m in methods if m not in method_factory.METHOD_NAMES]
             + [d for d in dtypes if d not in models.COMPUTE_DTYPES])
  if unknown:
    raise ValueError(f"unknown {', '.join(unknown)}; methods: "
                     f"{', '.join(method_factory.METHOD_NAMES)}; dtypes: "
                     f"{', '.join(models.COMPUTE_DTYPES)}")
  image_shape = tuple(int(s) for s in image_shape)
  devices = jax.devices()
  devices = devices[:num_devices or len(devices)]
  if batch_size % len(devices):
    raise ValueError(f"batch_size={batch_size} must be divisible by {len(devices)} devices")
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} exceeds num_examples={num_examples}")
  runner = parallel.make_runner("shard_map", devices)
  channels = image_shape[-1]
  augmentation = Augmentation(crop_padding=crop_padding, flip=flip, mean=(0.5,) * channels,
                              std=(0.25,) * channels)
  batch_kwargs = dict(num_batches=max(steps, warmup, 1), batch_size=batch_size,
                      image_shape=image_shape, num_classes=num_classes,
                      num_examples=num_examples, seed=seed)
  plain_batches = synthetic_batches(runner, **batch_kwargs)
  paired_batches = None  # made on first use (CS-KD)

  cases = []
  build_start = time.perf_counter()
  for method in methods:
    for dtype in dtypes:
      spent = time.perf_counter() - build_start
      if build_budget_s and spent > build_budget_s and method != "ce":
        log(f"skipped {method} / {dtype}: {spent:.0f} s of building spent "
            f"(--build_budget_s={build_budget_s:g})")
        continue
      log(f"building {method} / {dtype}")
      try:
        case = StepCase(method, dtype, runner=runner, model_name=model, image_shape=image_shape,
                        num_classes=num_classes, num_examples=num_examples,
                        batch_size=batch_size, augmentation=augmentation, seed=seed)
        if case.needs_partners and paired_batches is None:
          paired_batches = synthetic_batches(runner, partners=True, **batch_kwargs)
        case.batches = paired_batches if case.needs_partners else plain_batches
        case.compile(case.batches[0])
        case.run(case.batches[:warmup], record=False)
      except Exception as error:  # pylint: disable=broad-except  # time the others
        if method == "ce":
          raise  # every ratio needs CE
        log(f"FAILED {method} / {dtype}: {type(error).__name__}: {error}")
        continue
      log(f"built {method} / {dtype}: compiled in {case.compile_s:.1f} s")
      # The process-wide high-water mark so far (it includes the cases built before this one).
      case.peak_memory_bytes = _peak_memory_bytes(devices[0])
      cases.append(case)
  cases.sort(key=lambda case: (dtypes.index(case.dtype_name), methods.index(case.method_name)))

  for r in range(rounds):
    log(f"round {r + 1}/{rounds}")
    for case in cases:
      case.run(case.batches[:steps], record=True)

  device = devices[0]
  ce_median = {case.dtype_name: case.percentiles_ms()[1] for case in cases
               if case.method_name == "ce"}
  ce_case = {case.dtype_name: case for case in cases if case.method_name == "ce"}
  records = []
  for case in cases:
    p10, median, p90 = case.percentiles_ms()
    records.append({
        "method": case.method_name, "model": model, "batch_size": batch_size,
        "dtype": case.dtype_name, "device": device.device_kind, "platform": device.platform,
        "num_devices": len(devices), "image_shape": list(image_shape),
        "num_classes": num_classes, "num_examples": num_examples,
        "step_time_ms": median, "step_time_ms_p10": p10, "step_time_ms_p90": p90,
        "ratio_to_ce": median / ce_median[case.dtype_name],
        "images_per_s": batch_size / (median / 1e3), "timed_steps": len(case.samples_ms),
        "state_bytes_per_device": case.state_bytes_per_device,
        "peak_memory_bytes": case.peak_memory_bytes,
        "compiled_memory_bytes": case.compiled_memory_bytes, "temp_bytes": case.temp_bytes,
        "flops": case.flops, "bytes_accessed": case.bytes_accessed,
        "flops_ratio_to_ce": _ratio(case.flops, ce_case[case.dtype_name].flops),
        "bytes_ratio_to_ce": _ratio(case.bytes_accessed,
                                    ce_case[case.dtype_name].bytes_accessed),
        "compile_s": case.compile_s,
        "jax_version": jax.__version__, "timestamp": timestamp,
    })
  return records


def markdown_table(records: list[dict[str, Any]]) -> str:
  """One row per record; a cost field that is missing or null (an older record, a backend
  without the analysis) shows as '–'."""

  def cell(record, key, scale=1.0, digits=3):
    value = record.get(key)
    return "–" if value is None else f"{value / scale:.{digits}f}"

  lines = ["| method | dtype | step ms (median) | p10–p90 ms | × CE | images/s | "
           "table MiB/device | GFLOP | FLOPs × CE | MiB accessed | bytes × CE | temp MiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    lines.append(f"| {r['method']} | {r['dtype']} | {r['step_time_ms']:.2f} | "
                 f"{r['step_time_ms_p10']:.2f}–{r['step_time_ms_p90']:.2f} | "
                 f"{r['ratio_to_ce']:.3f} | {r['images_per_s']:.0f} | "
                 f"{r['state_bytes_per_device'] / 2**20:.2f} | "
                 f"{cell(r, 'flops', 1e9)} | {cell(r, 'flops_ratio_to_ce')} | "
                 f"{cell(r, 'bytes_accessed', 2**20, 1)} | {cell(r, 'bytes_ratio_to_ce')} | "
                 f"{cell(r, 'temp_bytes', 2**20, 2)} |")
  return "\n".join(lines)


def _csv(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", type=_csv, default=list(method_factory.METHOD_NAMES),
                      help="comma-separated; default: every name in METHOD_NAMES")
  parser.add_argument("--model", default="preact_resnet18", choices=models.MODEL_NAMES)
  parser.add_argument("--image_shape", type=lambda s: tuple(int(x) for x in _csv(s)),
                      default=(32, 32, 3), help="H,W,C")
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--num_examples", type=int, default=50_000,
                      help="rows of the per-example tables")
  parser.add_argument("--batch_size", type=int, default=128, help="global, over all devices")
  parser.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"],
                      help=f"compute dtypes, from {', '.join(models.COMPUTE_DTYPES)}")
  parser.add_argument("--steps", type=int, default=50, help="timed steps per method per round")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds over methods")
  parser.add_argument("--num_devices", type=int, default=0, help="0 = every visible device")
  parser.add_argument("--crop_padding", type=int, default=4, help="augmentation: crop padding")
  parser.add_argument("--flip", type=int, default=1, help="augmentation: random flip (0/1)")
  parser.add_argument("--build_budget_s", type=float, default=0.0,
                      help="stop building new cases after this many seconds of building and "
                           "time those built (0 = build every case)")
  parser.add_argument("--out", default="",
                      help="output JSON (default: benchmarks/results/<device kind>.json)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  records = run_benchmark(methods=args.methods, model=args.model, image_shape=args.image_shape,
                          num_classes=args.num_classes, num_examples=args.num_examples,
                          batch_size=args.batch_size, dtypes=args.dtypes, steps=args.steps,
                          warmup=args.warmup, rounds=args.rounds, num_devices=args.num_devices,
                          crop_padding=args.crop_padding, flip=bool(args.flip),
                          build_budget_s=args.build_budget_s)
  out = args.out or os.path.join(RESULTS_DIR, device_slug(records[0]["device"]) + ".json")
  write_results(records, out)
  print(markdown_table(records))
  print(f"\nwrote {out}")
  timed = {(r["method"], r["dtype"]) for r in records}
  missing = [f"{m}/{d}" for d in args.dtypes for m in dict.fromkeys(["ce", *args.methods])
             if (m, d) not in timed]
  if missing:
    print(f"not timed (skipped or failed, see the log above): {', '.join(missing)}",
          file=sys.stderr)
    sys.exit(1)
  return records


if __name__ == "__main__":
  main()
