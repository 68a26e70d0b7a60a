"""ImageNet-size per-example state: memory, step time against N, and checkpoint cost.

PS-KD keeps one past prediction per training example: at ImageNet's N = 1,281,167 and C = 1000
that is 5.1 GB in float32 (2.6 GB in bfloat16), the reason to shard it by rows. This measures,
for each storage dtype and for N = 50,000 and N = 1,281,167 side by side, on the devices of
this process (4 fake CPU devices by default), or over several processes (`--processes`):

- `table_bytes_per_device`: the table's rows each device holds;
- `temp_bytes`: XLA's temporaries of the compiled train step (a copy of the table would show
  here; see `scatter_rows(after=)`);
- `step_ms` (median, p10, p90): one PS-KD train step of a small MLP at a fixed batch, timed
  alone; with the table updated in place it does not depend on N;
- `save_s`, `restore_s`, `checkpoint_bytes`: one verified checkpoint of the whole train state
  (`selfkd_jax.train.checkpoint.Checkpointer`, checksums included) and its restore;
- `rss_after_each_save_bytes` after each of `--saves` train-then-save cycles: host memory must
  not creep; `peak_rss_bytes`: the process's high-water mark so far (cases run in order, so a
  later case shows an earlier one's peak if that was higher).

`--processes=2` starts this script twice as one multi-controller JAX run on 127.0.0.1 (the way
the README's "two processes on one machine" starts launch.py: JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, a free port), each process with 4 / 2 = 2 fake CPU devices, so
the global mesh is the same 4 devices. Each process builds its own rows of the table, feeds only
its slice of every global batch, and saves and restores its own shards with the same
Checkpointer into one shared directory; save and restore are timed from a barrier before to a
barrier after, so they cover the slowest process. Process 0 gathers every process's resident
memory and table bytes per device (`per_process`), writes the results and prints the table;
`peak_rss_bytes` and `rss_after_each_save_bytes` are then the largest process's. The same
worker runs on a real cluster when started once per host with the JAX_* variables (or by srun),
with --tmp on a file system every host sees.

The model is deliberately small (an MLP on 8x8x3 images): the point is the state, not the
network. Nothing is read from disk; the checkpoint goes to a temporary directory (or --tmp).

    python benchmarks/scale.py                       # 4 fake CPU devices, both dtypes
    python benchmarks/scale.py --dtypes=bfloat16 --num_examples=1281167
    python benchmarks/scale.py --processes=2         # 2 processes x 2 fake CPU devices

Results: `benchmarks/results/scale_<device kind>.json` (`scale_cpu_<P>proc.json` with
--processes=P; or --out) and a table on stdout. Every record says how many processes made it,
and the file the machine's load average before and after (a busy machine slows the steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

FAKE_CPU_DEVICES = 4  # over all processes
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" {_DEVICE_COUNT_FLAG}={FAKE_CPU_DEVICES}").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.experimental import multihost_utils  # pylint: disable=wrong-import-position

import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from selfkd_jax.methods import PerExampleTable, table_bytes  # pylint: disable=wrong-import-position
from selfkd_jax.train import cluster, parallel  # pylint: disable=wrong-import-position
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


def _barrier(name: str) -> None:
  """Every process waits here for the others (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _gather(value) -> list:
  """`value` (anything JSON can hold) from every process, in process order."""
  if jax.process_count() == 1:
    return [value]
  data = json.dumps(value).encode()
  size = int(np.max(multihost_utils.process_allgather(np.int32(len(data)))))
  rows = multihost_utils.process_allgather(np.frombuffer(data.ljust(size), np.uint8))
  return [json.loads(bytes(row)) for row in np.asarray(rows)]


def _local_batches(runner, *, batch_size, **kwargs):
  """step_time's synthetic global batches; each process puts only its contiguous slice of every
  batch on its devices (as the data pipeline does), which `put_batch` assembles into global
  arrays. With one process: `step_time.synthetic_batches`."""
  local = batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  return [runner.put_batch({k: v[rows] for k, v in host.items()})
          for host in step_time.synthetic_host_batches(batch_size=batch_size, **kwargs)]


def _local_table_bytes(method_state) -> dict[str, int]:
  """`{device id: bytes of table rows it holds}` for this process's devices."""
  held = {}
  for rows in jax.tree.leaves(method_state):
    if rows.ndim == 2:
      for shard in rows.addressable_shards:
        held[str(shard.device.id)] = held.get(str(shard.device.id), 0) + shard.data.nbytes
  return held


def measure(*, num_examples: int, dtype: str, num_classes: int, batch_size: int, steps: int,
            saves: int, runner, workdir: str) -> dict:
  """One (N, dtype) case: compile, time `steps` steps, then `saves` save cycles, a restore.

  With several processes every process runs it (collectively) and gets the same record.
  """
  # step_time.py's harness builds the step exactly as the trainer does.
  case = step_time.StepCase(
      "pskd", "float32", runner=runner, model_name="mlp", image_shape=IMAGE_SHAPE,
      num_classes=num_classes, num_examples=num_examples, batch_size=batch_size,
      augmentation=Augmentation(crop_padding=0, flip=False, mean=(0.5,) * 3, std=(0.25,) * 3),
      seed=0, method_overrides={"storage_dtype": dtype})
  batches = _local_batches(
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
    _barrier("scale: save")
    start = time.perf_counter()
    checkpointer.save(cycle + 1, case.state)
    _barrier("scale: saved")  # process 0 also writes the checksums: the save ends here
    save_s.append(time.perf_counter() - start)
    rss_after_saves.append(_current_rss_bytes())
  step_dir = os.path.join(checkpointer.directory, str(saves))
  checkpoint_bytes = _directory_bytes(step_dir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          case.state)
  start = time.perf_counter()
  restored, _ = checkpointer.restore(abstract)
  jax.block_until_ready(restored)
  _barrier("scale: restored")
  restore_s = time.perf_counter() - start
  checkpointer.close()
  del restored
  record = {
      "num_examples": num_examples, "num_classes": num_classes, "storage_dtype": dtype,
      "processes": jax.process_count(), "num_devices": runner.num_devices,
      "batch_size": batch_size,
      "table_bytes_per_device": table_bytes(case.state.method_state, runner.num_devices),
      "temp_bytes": case.temp_bytes, "step_ms": median, "step_ms_p10": p10,
      "step_ms_p90": p90, "save_s": save_s, "restore_s": restore_s,
      "checkpoint_bytes": checkpoint_bytes, "rss_after_each_save_bytes": rss_after_saves,
      "peak_rss_bytes": _peak_rss_bytes(),
  }
  if jax.process_count() == 1:
    return record
  # Timed on every process, from a common barrier: process 0's times are the run's.
  per_process = _gather({
      "process_index": jax.process_index(),
      "table_bytes_by_device": _local_table_bytes(case.state.method_state),
      "step_ms": median, "step_ms_p10": p10, "step_ms_p90": p90, "save_s": save_s,
      "restore_s": restore_s, "rss_after_each_save_bytes": rss_after_saves,
      "peak_rss_bytes": record["peak_rss_bytes"]})
  record.update(
      per_process=per_process,
      rss_after_each_save_bytes=[max(p["rss_after_each_save_bytes"][i] for p in per_process)
                                 for i in range(saves)],
      peak_rss_bytes=max(p["peak_rss_bytes"] for p in per_process))
  return record


FILL_CHUNK_ROWS = 4096


def _filled(method_state):
  """`method_state` with every table row a random probability vector (softmax of normal
  logits), written in place: each device fills its own rows, FILL_CHUNK_ROWS at a time, into
  the donated table. (Made whole, the random logits and their softmax are temporaries of three
  to four tables, the process's peak memory by far at 1.28M rows.)"""

  def fill(table):
    rows, sharding = table.rows, table.rows.sharding
    # One device holds every row whatever the spec (the runner leaves a 1-device table unsplit).
    if sharding.spec[:1] != (parallel.AXIS,) and sharding.mesh.size > 1:
      raise ValueError(f"a table sharded by rows was expected, got {sharding.spec}")

    def local(block):  # this device's rows
      chunk = min(FILL_CHUNK_ROWS, block.shape[0])
      key = jax.random.fold_in(jax.random.PRNGKey(0), jax.lax.axis_index(parallel.AXIS))

      def body(i, block):
        logits = jax.random.normal(jax.random.fold_in(key, i), (chunk, block.shape[1]),
                                   jax.numpy.float32)
        start = jax.numpy.minimum(i * chunk, block.shape[0] - chunk)  # the last one overlaps
        return jax.lax.dynamic_update_slice_in_dim(
            block, table.as_stored(jax.nn.softmax(logits, axis=-1)), start, axis=0)

      return jax.lax.fori_loop(0, -(-block.shape[0] // chunk), body, block)

    by_rows = jax.sharding.PartitionSpec(parallel.AXIS)
    mapped = jax.shard_map(local, mesh=sharding.mesh, in_specs=by_rows, out_specs=by_rows)
    return table.with_rows(jax.jit(mapped, donate_argnums=0, out_shardings=sharding)(rows))

  is_table = lambda x: isinstance(x, PerExampleTable)
  return jax.tree.map(lambda x: fill(x) if is_table(x) else x, method_state, is_leaf=is_table)


def markdown_table(records: list[dict]) -> str:
  """One row per record; with several processes the RSS cell lists each process's values."""
  gb = 1e9

  def rss(r):
    if "per_process" not in r:
      return ", ".join(f"{b / gb:.2f}" for b in r["rss_after_each_save_bytes"])
    return "; ".join(f"p{p['process_index']}: "
                     + ", ".join(f"{b / gb:.2f}" for b in p["rss_after_each_save_bytes"])
                     for p in r["per_process"])

  lines = ["| N | dtype | processes | table/device GB | step temp MB | step ms (p10-p90) | "
           "save s | restore s | checkpoint GB | RSS after each save GB |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in records:
    lines.append(
        f"| {r['num_examples']:,} | {r['storage_dtype']} | {r.get('processes', 1)} "
        f"| {r['table_bytes_per_device'] / gb:.3f} "
        f"| {r['temp_bytes'] / 1e6:.1f} | {r['step_ms']:.1f} ({r['step_ms_p10']:.1f}-"
        f"{r['step_ms_p90']:.1f}) | {np.median(r['save_s']):.1f} | {r['restore_s']:.1f} | "
        f"{r['checkpoint_bytes'] / gb:.2f} | {rss(r)} |")
  return "\n".join(lines)


def _machine() -> dict:
  """What the host is: CPU model, cores, memory (Linux; fields it cannot read are None)."""
  model, memory = None, None
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), None)
    with open("/proc/meminfo") as f:
      memory = next((int(line.split()[1]) * 1024 for line in f
                     if line.startswith("MemTotal:")), None)
  except OSError:
    pass
  return {"processor": platform.processor() or platform.machine(), "cpu_model": model,
          "cpu_count": os.cpu_count(), "memory_bytes": memory}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(argv: list[str], processes: int, out: str) -> int:
  """Starts this script `processes` times as one JAX run on this machine's CPU (fake devices,
  FAKE_CPU_DEVICES over all); returns 0, or the first failing process's exit code after
  stopping the others."""
  if FAKE_CPU_DEVICES % processes:
    raise SystemExit(f"--processes={processes} must divide the {FAKE_CPU_DEVICES} devices")
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith(_DEVICE_COUNT_FLAG)]
  xla_flags.append(f"{_DEVICE_COUNT_FLAG}={FAKE_CPU_DEVICES // processes}")
  address = f"127.0.0.1:{_free_port()}"
  children = []
  for i in range(processes):
    env = {k: v for k, v in os.environ.items() if k not in dict(cluster.EXPLICIT).values()}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(xla_flags),
               JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(i))
    children.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, f"--out={out}"], env=env))
  try:
    while True:
      codes = [child.poll() for child in children]
      failed = [code for code in codes if code not in (None, 0)]
      if failed:
        print(f"scale.py: a process exited with {failed[0]}; stopping the others",
              file=sys.stderr, flush=True)
        return failed[0]
      if all(code == 0 for code in codes):
        return 0
      time.sleep(0.5)
  finally:
    for child in children:
      if child.poll() is None:
        child.terminate()
        try:
          child.wait(timeout=30)
        except subprocess.TimeoutExpired:
          child.kill()
          child.wait()


def main(argv=None) -> list[dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_examples", default="50000,1281167")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--processes", type=int, default=1,
                      help="Start this many processes of one JAX run on this machine's CPU "
                      f"({FAKE_CPU_DEVICES} fake devices over all of them).")
  parser.add_argument("--tmp", default=None, help="Where checkpoints go (default: a temp dir; "
                      "on a multi-host run, a directory every host sees).")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  # Started by _launch (or once per host with the JAX_* variables, or by srun): a worker.
  launch = cluster.resolve({}, os.environ, distributed=None if args.processes > 1 else False)
  if args.processes > 1 and not launch.distributed:
    out = args.out or os.path.join(step_time.RESULTS_DIR, f"scale_cpu_{args.processes}proc.json")
    code = _launch([a for a in argv if not a.startswith("--out")], args.processes, out)
    if code:
      raise SystemExit(code)
    with open(out) as f:
      return json.load(f)["records"]
  cluster.initialize(launch, heartbeat_timeout_s=60)
  loadavg_start = os.getloadavg()

  devices = jax.devices()
  runner = parallel.make_runner("shard_map", devices)
  leader = jax.process_index() == 0
  records = []
  for dtype in args.dtypes.split(","):
    for num_examples in (int(n) for n in args.num_examples.split(",")):
      # One directory for all processes: process 0 makes it and tells the others.
      workdir = _gather(tempfile.mkdtemp(prefix="selfkd_scale_", dir=args.tmp)
                        if leader else None)[0]
      try:
        record = measure(num_examples=num_examples, dtype=dtype, num_classes=args.num_classes,
                         batch_size=args.batch_size, steps=args.steps, saves=args.saves,
                         runner=runner, workdir=workdir)
        _barrier("scale: case done")  # every process is done with the directory
      finally:
        if leader:
          shutil.rmtree(workdir, ignore_errors=True)
      record["loadavg"] = list(os.getloadavg())
      records.append(record)
      if leader:
        print(markdown_table([record]).splitlines()[-1], flush=True)
  kind = devices[0].device_kind
  result = {"device_kind": kind, "platform": devices[0].platform,
            "processes": jax.process_count(), "num_devices": len(devices),
            "devices_per_process": jax.local_device_count(), **_machine(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "loadavg_start": list(loadavg_start), "loadavg_end": list(os.getloadavg()),
            "records": records}
  if leader:
    suffix = f"_{jax.process_count()}proc" if jax.process_count() > 1 else ""
    out = args.out or os.path.join(step_time.RESULTS_DIR,
                                   f"scale_{step_time.device_slug(kind)}{suffix}.json")
    step_time.write_results(result, out)
    print(markdown_table(records))
    print(f"results: {out}")
  return records


if __name__ == "__main__":
  main()
