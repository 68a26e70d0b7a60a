"""PS-KD train step: selfkd_jax against a PyTorch step written the way the official code does it.

Issue #14 ("against what users would pick instead"). One process, one device, the same network,
batch and table size on both sides; the sides take turns (round-robin) so slow phases of a shared
machine hit both alike. Only timing: nothing is asserted about speed.

selfkd_jax side: the jitted train step for method 'pskd', built from the trainer's pieces the way
`benchmarks/step_time.py` builds it (`parallel.make_runner('shard_map', ...)` on ONE device,
`models.get_model('preact_resnet18', bn_axis_name='data')`, `method_factory.setup_method`,
`optim.make_optimizer`, `step.make_train_step`, `runner.init_state` / `compile_train`), with the
optimizer of `cifar100_recipes.pskd()` (SGD momentum 0.9 Nesterov, weight decay
5e-4 added to the gradient). The N x C fp32 past-prediction table lives on the device, inside
the train state. Batches are device-resident uint8 images; the step does crop (pad 4) + flip +
normalise on the device, as the trainer's does, then forward, PS-KD loss, backward, SGD and the
in-place scatter of the new softmax rows. Each step is waited for (`block_until_ready`).

PyTorch side, as lgcnsai/PS-KD-Pytorch `main.py` (`train()`) and `loss/pskd_loss.py` do it:
  - `all_predictions`: a `torch.zeros(N, C, float32)` CPU tensor (host memory, also with CUDA);
  - per step: `inputs/targets.to(device, non_blocking=True)`; `targets.cpu().numpy()`; one-hot
    rows of a host `torch.eye(C)`; soft targets `(1 - alpha) * one_hot + alpha *
    all_predictions[indices]` built on the host (gather by the batch's dataset indices) and moved
    to the device; forward; `softmax(outputs)`; loss `(-targets * log_softmax(outputs)).mean(0)
    .sum()`; `loss.item()` and top-1/top-5 `accuracy(...)` `.item()`s; `zero_grad`, `backward`,
    `torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4, nesterov=True).step()`; the
    `correct += predicted.eq(targets).sum().item()` count; then the scatter
    `all_predictions[indices] = softmax_output.detach().cpu()`.
  - the network: PS-KD's `CIFAR_ResNet18_preActBasic` layout (`models/preact_resnet.py`), written
    here: 3x3 stem conv (64) -> BN -> ReLU, 2+2+2+2 pre-activation blocks at 64/128/256/512
    (strides 1/2/2/2; 1x1 projection without BN on the pre-activated input; identity shortcut
    taken from the pre-activated input), no BN-ReLU after the last stage, 4x4 average pool,
    Linear with bias. 11,217,444 parameters at 100 classes, equal to `preact_resnet18`.
  - `cudnn.benchmark = True` on CUDA, as the official `main_worker` sets it.
  - Augmentation is NOT in the timed torch step: the official code does it in DataLoader worker
    processes (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize), in parallel with
    the step; its batches here are already-normalised float32 NCHW tensors (pinned with CUDA),
    i.e. what the loader hands the loop. Our step's on-device augmentation IS timed, and our
    host->device copy is not (the trainer prefetches batches in a background thread).
  - Not reproduced: DistributedDataParallel / all_gather (one device here), the per-step
    `progress_bar` print, the epoch-0-only one-hot write into `all_predictions`, and the first
    release's `Variable(inputs, requires_grad=True)` (a gradient w.r.t. the input images, dropped
    in later versions of main.py).

Threads: on CPU, XLA runs its intra-op work on one thread per schedulable core
(`os.sched_getaffinity`); torch gets `torch.set_num_threads` of that same count (printed and
recorded). With CUDA torch keeps its default thread count.

Example:
  python benchmarks/torch_side_by_side.py --device=cpu --steps=5 --warmup=2 \
      --out=benchmarks/results/torch_side_by_side_cpu.json
  python benchmarks/torch_side_by_side.py --device=cuda --steps=50 --warmup=10

Writes a JSON list with one record per side (`--out`) and a markdown table to stdout. Needs
`benchmarks/requirements-torch.txt` (the library itself never imports torch).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Any, Sequence

# Runs from a checkout without installing the package: the repository root goes on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfkd_jax.train import cifar100_recipes, parallel
from selfkd_jax.train.step import Augmentation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # step_time.py, beside this file
import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from step_time import RESULTS_DIR, synthetic_host_batches  # pylint: disable=g-import-not-at-top

MODEL = "preact_resnet18"
IMAGE_SHAPE = (32, 32, 3)
# The official CIFAR-100 Normalize constants (loader/custom_dataloader.py).
CIFAR100_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_STD = (0.2023, 0.1994, 0.2010)


# ----------------------------------------------------------------------------------------------
# PyTorch PreAct ResNet-18 (PS-KD layout)
# ----------------------------------------------------------------------------------------------

class TorchPreActBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the shortcut reads the pre-activated input."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.projection = (nn.Conv2d(in_channels, channels, 1, stride, bias=False)
                       if stride != 1 or in_channels != channels else None)

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    shortcut = pre if self.projection is None else self.projection(pre)
    y = self.conv1(pre)
    y = self.conv2(F.relu(self.bn2(y)))
    return y + shortcut


class TorchPreActResNet18(nn.Module):
  """3x3 stem -> BN -> ReLU, four stages of two TorchPreActBlocks, 4x4 average pool, Linear."""

  def __init__(self, num_classes: int, blocks_per_stage: Sequence[int] = (2, 2, 2, 2)):
    super().__init__()
    self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(64)
    layers, in_channels = [], 64
    for stage, (count, channels) in enumerate(zip(blocks_per_stage, (64, 128, 256, 512))):
      for j in range(count):
        layers.append(TorchPreActBlock(in_channels, channels, 2 if stage > 0 and j == 0 else 1))
        in_channels = channels
    self.blocks = nn.Sequential(*layers)
    self.classifier = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # = avg_pool2d(4) on the 4x4 map of 32x32 input
    return self.classifier(x)


def _topk_correct(outputs, targets, topk=(1, 5)):
  """The official `accuracy()`: percentage of the batch whose label is in the top k."""
  with torch.no_grad():
    maxk = min(max(topk), outputs.shape[1])
    _, pred = outputs.topk(maxk, 1, True, True)
    correct = pred.t().eq(targets.reshape(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / targets.size(0))
            for k in topk]


class TorchPSKD:
  """The official PS-KD training loop body, one batch per `step` call."""

  def __init__(self, *, device: str, num_examples: int, num_classes: int, alpha: float = 0.8 / 300,
               lr: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.num_classes = num_classes
    self.alpha = alpha
    self.net = TorchPreActResNet18(num_classes).to(self.device)
    self.net.train()
    self.optimizer = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=0.9,
                                     weight_decay=5e-4, nesterov=True)
    # Host-resident, like the official `all_predictions`; filled with 1/C (a probability row)
    # rather than zeros so the timed steps are in the steady state of epoch >= 1.
    self.all_predictions = torch.full((num_examples, num_classes), 1.0 / num_classes,
                                      dtype=torch.float32)
    self.identity = torch.eye(num_classes)
    self.correct = 0
    self.total = 0
    self.samples_ms: list[float] = []

  def num_parameters(self) -> int:
    return sum(p.numel() for p in self.net.parameters())

  def step(self, inputs, targets, input_indices):
    """One training step; returns the (detached, host) logits it computed."""
    inputs = inputs.to(self.device, non_blocking=True)
    targets = targets.to(self.device, non_blocking=True)
    targets_numpy = targets.cpu().detach().numpy()
    targets_one_hot = self.identity[targets_numpy]
    soft_targets = ((1 - self.alpha) * targets_one_hot
                    + self.alpha * self.all_predictions[input_indices])  # host gather
    soft_targets = soft_targets.to(self.device)
    outputs = self.net(inputs)
    softmax_output = F.softmax(outputs, dim=1)
    loss = (-soft_targets * F.log_softmax(outputs, dim=1)).mean(0).sum()
    loss.item()
    top1, top5 = _topk_correct(outputs.data, targets)
    top1.item(), top5.item()
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    _, predicted = torch.max(outputs, 1)
    self.total += targets.size(0)
    self.correct += predicted.eq(targets).sum().item()
    self.all_predictions[input_indices] = softmax_output.detach().cpu()  # host scatter
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
    return outputs.detach().cpu()

  def run(self, batches, record: bool) -> None:
    for images, labels, indices in batches:
      start = time.perf_counter()
      self.step(images, labels, indices)
      if record:
        self.samples_ms.append((time.perf_counter() - start) * 1e3)


# ----------------------------------------------------------------------------------------------
# selfkd_jax side
# ----------------------------------------------------------------------------------------------

def jax_pskd(*, device, num_examples: int, num_classes: int, batch_size: int,
             seed: int = 0) -> step_time.StepCase:
  """Our PS-KD train step on one device: `step_time.py`'s harness with PS-KD's CIFAR-100 recipe
  (its optimizer and schedule) and the official CIFAR-100 normalisation."""
  recipe = cifar100_recipes.pskd()
  augmentation = Augmentation(crop_padding=recipe.data.crop_padding, flip=bool(recipe.data.flip),
                              mean=CIFAR100_MEAN, std=CIFAR100_STD)
  return step_time.StepCase(
      "pskd", "float32", runner=parallel.make_runner("shard_map", [device]), model_name=MODEL,
      image_shape=IMAGE_SHAPE, num_classes=num_classes, num_examples=num_examples,
      batch_size=batch_size, augmentation=augmentation, seed=seed, recipe=recipe)


# ----------------------------------------------------------------------------------------------
# Shared data, timing and records
# ----------------------------------------------------------------------------------------------

def torch_batch(host: dict[str, np.ndarray], pin: bool):
  """What the official DataLoader yields: normalised float32 NCHW images, int64 labels/indices."""
  images = host["image"].astype(np.float32) / 255.0
  images = (images - np.asarray(CIFAR100_MEAN, np.float32)) / np.asarray(CIFAR100_STD, np.float32)
  images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  labels = torch.from_numpy(host["label"].astype(np.int64))
  indices = torch.from_numpy(host["index"].astype(np.int64))
  if pin:
    images, labels, indices = images.pin_memory(), labels.pin_memory(), indices.pin_memory()
  return images, labels, indices


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def schedulable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def jax_device(kind: str):
  if kind == "cpu":
    return jax.devices("cpu")[0]
  if kind == "cuda":
    return jax.devices("gpu")[0]
  raise ValueError(f"unknown device {kind!r}; allowed: cpu, cuda")


def _load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except (AttributeError, OSError):
    return None


def run_benchmark(*, device: str = "cpu", steps: int = 20, warmup: int = 3, rounds: int = 3,
                  batch_size: int = 128, num_examples: int = 50_000, num_classes: int = 100,
                  seed: int = 0, log=None) -> list[dict[str, Any]]:
  """Times both steps; returns [selfkd_jax record, torch record]."""
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} exceeds num_examples={num_examples}")
  if device == "cuda" and not torch.cuda.is_available():
    raise ValueError("--device=cuda but torch sees no CUDA device (is a CUDA build installed?)")
  timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  load_before = _load_average()
  cores = schedulable_cores()
  if device == "cpu":
    torch.set_num_threads(cores)
  threads_note = (f"CPU: XLA uses one intra-op thread per schedulable core ({cores}); "
                  f"torch.set_num_threads({torch.get_num_threads()})" if device == "cpu" else
                  f"CUDA: torch host threads left at default ({torch.get_num_threads()})")
  log(threads_note)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True

  hosts = synthetic_host_batches(num_batches=max(steps, warmup, 1), batch_size=batch_size,
                                 image_shape=IMAGE_SHAPE, num_classes=num_classes,
                                 num_examples=num_examples, seed=seed)
  dev = jax_device(device)
  log(f"building selfkd_jax pskd on {dev.device_kind}")
  ours = jax_pskd(device=dev, num_examples=num_examples, num_classes=num_classes,
                  batch_size=batch_size, seed=seed)
  jax_batches = [ours.runner.put_batch(h) for h in hosts]
  ours.compile(jax_batches[0])
  log(f"compiled in {ours.compile_s:.1f} s; warm-up")
  ours.run(jax_batches[:warmup], record=False)

  log("building torch PS-KD (official style)")
  theirs = TorchPSKD(device=device, num_examples=num_examples, num_classes=num_classes,
                     seed=seed)
  t_batches = [torch_batch(h, pin=device == "cuda") for h in hosts]
  theirs.run(t_batches[:warmup], record=False)

  for r in range(rounds):
    log(f"round {r + 1}/{rounds}")
    ours.run(jax_batches[:steps], record=True)
    theirs.run(t_batches[:steps], record=True)

  if device == "cuda":
    hardware = torch.cuda.get_device_name(theirs.device)
  else:
    hardware = cpu_name()
  common = {
      "method": "pskd", "model": MODEL, "batch_size": batch_size, "num_examples": num_examples,
      "num_classes": num_classes, "image_shape": list(IMAGE_SHAPE), "dtype": "float32",
      "device": device, "hardware": hardware, "cpu": cpu_name(),
      "jax_device_kind": dev.device_kind, "schedulable_cores": cores,
      "torch_num_threads": torch.get_num_threads(), "threads": threads_note,
      "jax_version": jax.__version__, "torch_version": torch.__version__,
      "python_version": platform.python_version(), "rounds": rounds, "warmup": warmup,
      # The machine's 1-minute load average before and after: > cores means other work shared
      # the cores, which slows OpenMP (torch) more than XLA's thread pool.
      "load_average_1min": [load_before, _load_average()], "timestamp": timestamp,
  }
  records = []
  for side, case, extra in (
      ("selfkd_jax", ours, {
          "num_parameters": ours.num_parameters, "compile_s": ours.compile_s,
          "table_on": "device (train state, updated in place)",
          "timed": "augment (crop 4 + flip + normalise, on device) + forward + PS-KD loss + "
                   "backward + SGD + table gather/scatter; batch already on the device"}),
      ("torch_official_style", theirs, {
          "num_parameters": theirs.num_parameters(),
          "table_on": "host (CPU tensor, as the official all_predictions)",
          "timed": "batch to device + host one-hot/gather/soft targets + forward + loss + "
                   "official .item() metrics + backward + SGD + host scatter; augmentation "
                   "is the DataLoader workers' (not timed)"})):
    p10, median, p90 = step_time.percentiles_ms(case.samples_ms)
    records.append({"side": side, **common, **extra,
                    "step_time_ms": median, "step_time_ms_p10": p10, "step_time_ms_p90": p90,
                    "images_per_s": batch_size / (median / 1e3),
                    "timed_steps": len(case.samples_ms)})
  torch_ips = records[1]["images_per_s"]
  for record in records:
    record["ratio_to_torch_images_per_s"] = record["images_per_s"] / torch_ips
  return records


def markdown_table(records: list[dict[str, Any]]) -> str:
  lines = ["| side | step ms (median) | p10–p90 ms | images/s | × torch |",
           "|---|---:|---:|---:|---:|"]
  for r in records:
    lines.append(f"| {r['side']} | {r['step_time_ms']:.1f} | "
                 f"{r['step_time_ms_p10']:.1f}–{r['step_time_ms_p90']:.1f} | "
                 f"{r['images_per_s']:.1f} | {r['ratio_to_torch_images_per_s']:.2f} |")
  r = records[0]
  lines.append("")
  lines.append(f"PreAct ResNet-18, {r['num_classes']} classes, batch {r['batch_size']}, "
               f"N = {r['num_examples']} fp32 table, {r['timed_steps']} timed steps per side; "
               f"{r['device']} ({r['hardware']}); jax {r['jax_version']}, "
               f"torch {r['torch_version']}.")
  lines.append(r["threads"] + ".")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  parser.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
  parser.add_argument("--rounds", type=int, default=3, help="rounds, sides alternating")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_examples", type=int, default=50_000, help="rows of the table (N)")
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="",
                      help="output JSON (default: benchmarks/results/torch_side_by_side_<device>"
                           ".json)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  records = run_benchmark(device=args.device, steps=args.steps, warmup=args.warmup,
                          rounds=args.rounds, batch_size=args.batch_size,
                          num_examples=args.num_examples, num_classes=args.num_classes,
                          seed=args.seed)
  out = args.out or os.path.join(RESULTS_DIR, f"torch_side_by_side_{args.device}.json")
  step_time.write_results(records, out)
  print(markdown_table(records))
  print(f"\nwrote {out}")
  return records


if __name__ == "__main__":
  main()
