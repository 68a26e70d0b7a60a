"""benchmarks/torch_side_by_side.py at a tiny size: the torch step really gathers and scatters its
host table, both sides' records are complete. Skipped where torch is not installed (CI)."""

import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                      "torch_side_by_side.py")


def _load():
  spec = importlib.util.spec_from_file_location("torch_side_by_side", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_torch_step_gathers_and_scatters_its_own_softmax():
  bench = _load()
  num_examples, num_classes = 32, 100
  host = bench.synthetic_host_batches(num_batches=1, batch_size=8, image_shape=bench.IMAGE_SHAPE,
                                      num_classes=num_classes, num_examples=num_examples,
                                      seed=3)[0]
  images, labels, indices = bench.torch_batch(host, pin=False)
  side = bench.TorchPSKD(device="cpu", num_examples=num_examples, num_classes=num_classes,
                         alpha=0.5)
  # Distinct past rows: the gathered rows change the targets, hence the loss and the update.
  side.all_predictions.copy_(torch.softmax(torch.randn(num_examples, num_classes), dim=1))
  before = side.all_predictions.clone()

  logits = side.step(images, labels, indices)

  table = side.all_predictions
  assert table.device.type == "cpu" and table.dtype == torch.float32
  torch.testing.assert_close(table[indices], torch.softmax(logits, dim=1), rtol=0, atol=1e-7)
  untouched = np.setdiff1d(np.arange(num_examples), indices.numpy())
  assert len(untouched) == num_examples - 8
  assert torch.equal(table[untouched], before[untouched])
  assert not torch.allclose(table[indices], before[indices])
  assert side.total == 8 and side.num_parameters() == 11_217_444


def test_both_records_on_a_tiny_run(tmp_path, capsys):
  bench = _load()
  out = tmp_path / "side_by_side.json"
  records = bench.main(["--device=cpu", "--steps=1", "--warmup=1", "--rounds=1",
                        "--batch_size=8", "--num_examples=32", f"--out={out}"])
  assert json.loads(out.read_text()) == json.loads(json.dumps(records))
  assert [r["side"] for r in records] == ["selfkd_jax", "torch_official_style"]
  for r in records:
    assert r["images_per_s"] > 0 and r["timed_steps"] == 1
    assert r["step_time_ms_p10"] <= r["step_time_ms"] <= r["step_time_ms_p90"]
    assert r["num_parameters"] == 11_217_444
    assert r["jax_version"] and r["torch_version"] and r["hardware"]
    assert r["torch_num_threads"] == r["schedulable_cores"]
  assert records[1]["ratio_to_torch_images_per_s"] == 1.0
  assert "images/s" in capsys.readouterr().out
