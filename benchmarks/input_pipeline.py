"""Host input pipeline alone: decoded + cropped JPEG images per second, by worker count.

What the trainer runs for a variable-size TFDS dataset (imagenet2012, imagenette), without a
model: `TrainBatches` over an `EncodedImageSource` (JPEG bytes read by index from array_record,
PIL decode, RGB, torchvision's RandomResizedCrop(224) with bilinear resize) and the eval view
(`eval_batches`: Resize(256) + CenterCrop(224)), with the reads in 0..k grain worker processes
(`config.data.workers`; 0 = grain's reader threads in the main process). The flip and the
normalisation happen on the device and are not timed here.

The dataset is synthetic and written first to a temporary directory as a TFDS array_record
dataset: `--num_images` JPEGs per split (quality 90) of ImageNet's typical sizes (60% 500x375, 25%
375x500, the rest 300-800 x 250-600), a smooth colour field with shapes and noise, about
ImageNet's average file size (~110 KB). Nothing is downloaded.

For each view and worker count it reads `--batches` batches of `--batch_size` after one untimed
batch (the workers' start-up: spawn, imports, opening the files, reported as `first_batch_s`);
the eval view reads one pass over the test split, so at most its whole batches:

- `images_per_s`: steady-state images per second (timed batches / time from the first batch
  to the last);
- `images_per_s_per_worker`: that divided by the worker processes (by 1 for 0 workers);
- `cpu_ms_per_image`: CPU time of the main process and its workers together (user + system,
  from /proc) from the first batch to the last, per timed image: the work one image costs
  (decode, crop, resize, and moving it to the main process), whatever the parallelism.

It measures and asserts nothing. The machine is described in the file (CPU model, cores, load
average before and after: a busy machine gives fewer images per second).

    python benchmarks/input_pipeline.py                  # workers 0..cores, both views
    python benchmarks/input_pipeline.py --workers=0,4,8 --batches=40 --num_images=1000

Results: `benchmarks/results/input_pipeline_cpu.json` (or --out) and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image, ImageDraw, features  # pylint: disable=wrong-import-position

import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from selfkd_jax import data  # pylint: disable=wrong-import-position

NUM_CLASSES = 100


def synthetic_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
  """One photo-like JPEG of an ImageNet-typical size."""
  r = rng.random()
  if r < 0.6:
    width, height = 500, 375
  elif r < 0.85:
    width, height = 375, 500
  else:
    width, height = int(rng.integers(300, 801)), int(rng.integers(250, 601))
  field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(12):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    x1 = x0 + int(rng.integers(10, width // 2))
    y1 = y0 + int(rng.integers(10, height // 2))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
  pixels = np.asarray(image, np.float32) + rng.normal(0, 20, (height, width, 3))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                 quality=quality)
  return buffer.getvalue()


class SelfkdBenchJpeg(tfds.core.GeneratorBasedBuilder):
  """The synthetic JPEG dataset (train and test alike); NUM_IMAGES is set before building."""
  VERSION = tfds.core.Version("1.0.0")
  NUM_IMAGES = 600

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

  def _generate_examples(self, seed):
    rng = np.random.default_rng(seed)
    for key in range(self.NUM_IMAGES):
      yield key, {"image": synthetic_jpeg(rng), "label": key % NUM_CLASSES}


def _tree_cpu_seconds() -> float | None:
  """User + system CPU seconds of this process and its live descendants (the workers), from
  /proc; None where there is no /proc."""
  if not os.path.exists("/proc/self/stat"):
    return None
  tick = os.sysconf("SC_CLK_TCK")
  total, pending = 0.0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          pending.extend(int(child) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile (a helper process)
      continue
  return total


def measure(source, *, view: str, workers: int, batch_size: int, batches: int,
            seed: int = 0) -> dict:
  """Reads 1 + `batches` batches of one view with `workers` processes; times the last ones.

  The eval view reads one pass over the split (at most its whole batches)."""
  started = time.perf_counter()
  if view == "train":
    reader = data.TrainBatches(source, seed=seed, global_batch_size=batch_size, start_step=0,
                               num_steps=batches + 1, num_processes=workers)
  else:
    whole = min(batches + 1, len(source) // batch_size) * batch_size
    reader = data.eval_batches(source.take(whole), global_batch_size=batch_size,
                               num_processes=workers)
  times, cpu = [], []
  with reader:
    for batch in reader:
      assert batch["image"].shape[0] == batch_size
      times.append(time.perf_counter())
      if len(times) == 1 or len(times) == len(reader):  # after the first and the last batch
        cpu.append(_tree_cpu_seconds())
  timed = len(times) - 1
  images_per_s = timed * batch_size / (times[-1] - times[0])
  cpu_ms = (None if None in cpu or len(cpu) < 2
            else round(1e3 * (cpu[1] - cpu[0]) / (timed * batch_size), 2))
  return {"view": view, "workers": workers, "batch_size": batch_size, "timed_batches": timed,
          "first_batch_s": round(times[0] - started, 3),
          "images_per_s": round(images_per_s, 1),
          "images_per_s_per_worker": round(images_per_s / max(workers, 1), 1),
          "cpu_ms_per_image": cpu_ms,
          "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _machine() -> dict:
  model = None
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), None)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu_model": model, "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "usable_cores": cores,
          "pillow": Image.__version__ if hasattr(Image, "__version__") else None,
          "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
          "python": platform.python_version()}


def markdown_table(records: list[dict]) -> str:
  lines = ["| view | workers | images/s | images/s per worker | CPU ms / image | first batch s |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in records:
    lines.append(f"| {r['view']} | {r['workers']} | {r['images_per_s']:.0f} | "
                 f"{r['images_per_s_per_worker']:.0f} | {r['cpu_ms_per_image']} | "
                 f"{r['first_batch_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  cores = _machine()["usable_cores"] or 1
  parser.add_argument("--workers", default=",".join(str(k) for k in range(cores + 1)),
                      help="worker counts to time (default 0..cores)")
  parser.add_argument("--views", default="train,eval")
  parser.add_argument("--num_images", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=24, help="timed batches per case")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--out", default=os.path.join(step_time.RESULTS_DIR,
                                                    "input_pipeline_cpu.json"))
  args = parser.parse_args(argv)

  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # TFDS and grain read absl flags (their defaults)
  loadavg_start = os.getloadavg()
  tmp = tempfile.mkdtemp(prefix="selfkd_input_bench_")
  try:
    SelfkdBenchJpeg.NUM_IMAGES = args.num_images
    started = time.perf_counter()
    builder = tfds.builder("selfkd_bench_jpeg", data_dir=tmp)
    builder.download_and_prepare(file_format="array_record")
    written_s = time.perf_counter() - started
    train, test, _ = data.load_splits("selfkd_bench_jpeg", data_dir=tmp,
                                      image_size=args.image_size)
    sizes = _jpeg_sizes(tmp)
    records = []
    for view in args.views.split(","):
      for workers in (int(k) for k in args.workers.split(",")):
        record = measure(train if view == "train" else test, view=view, workers=workers,
                         batch_size=args.batch_size, batches=args.batches)
        print(markdown_table([record]).splitlines()[-1], flush=True)
        records.append(record)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  result = {**_machine(), "date": datetime.date.today().isoformat(),
            "loadavg_start": [round(x, 2) for x in loadavg_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "dataset": {"num_images": args.num_images, "quality": 90,
                        "mean_jpeg_bytes": int(np.mean(sizes)), "written_s": round(written_s, 1),
                        "image_size": args.image_size,
                        "resize_size": train.resize_size},
            "records": records}
  step_time.write_results(result, args.out)
  print(markdown_table(records))
  print(f"results: {args.out}")
  return result


def _jpeg_sizes(data_dir: str) -> list[int]:
  source = tfds.builder("selfkd_bench_jpeg", data_dir=data_dir).as_data_source(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  return [len(source[i]["image"]) for i in range(len(source))]


if __name__ == "__main__":
  main()
