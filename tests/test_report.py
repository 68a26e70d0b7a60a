"""python -m selfkd_jax.report on hand-written run directories: numbers, grouping, bad input."""

import csv
import json
import math
import os
import struct

import numpy as np
import pytest

from selfkd_jax.report import curves, groups
from selfkd_jax.report.__main__ import main

BASE_CONFIG = {
    "seed": 0, "num_epochs": 3, "batch_size": 128, "log_every_steps": 50, "progress_bar": True,
    "checkpoint_every_steps": 0, "keep_checkpoints": 2,
    "method": {"name": "ce"},
    "model": {"name": "lenet5_bn", "dtype": "float32", "num_classes": -1},
    "data": {"name": "fashion_mnist", "limit_train": 0},
    "optimizer": {"name": "sgd", "learning_rate": 0.05, "milestones": [150, 225]},
}


def make_run(path, *, seed, method=None, dataset="fashion_mnist", top1=None, best=None,
             finished=True, bins=None, history=None, train=None, **config_changes):
  """A run directory as the trainer leaves it; `top1`/`best` are the last/best test top-1."""
  os.makedirs(path)
  config = json.loads(json.dumps(BASE_CONFIG))
  config["seed"] = seed
  config["method"] = method or {"name": "ce"}
  config["data"]["name"] = dataset
  config.update(config_changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  history = history or [{"epoch": e, "step": 10 * e, "top1": top1 - 0.01 * (3 - e),
                         "nll": 1.0 / e, "ece": 0.1, "aurc": 0.05, "wall_s": e}
                        for e in (1, 2, 3)]
  with open(os.path.join(path, "eval_history.json"), "w") as f:
    json.dump(history, f)
  train = train or [{"kind": "train", "step": s, "loss": 2.0 / s, "accuracy": 0.1 * s}
                    for s in (5, 10, 15, 20, 25, 30)]
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
  if not finished:
    return
  results = {"test_top1": top1, "test_top5": 0.99, "test_nll": 0.3 + seed / 100,
             "test_ece": 0.02 * (seed + 1), "test_ece_10bins": 0.02, "test_aurc": 0.016,
             "best_test_top1": best if best is not None else top1, "best_epoch": 2,
             "epochs": 3, "wall_s": 100.0 + seed, "images_per_s": 5000.0,
             "method": config["method"]["name"], "model": "lenet5_bn", "dataset": dataset,
             "seed": seed}
  if bins is not None:
    results["test_calibration_bins"] = bins
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(results, f)


def sample_std(values):
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def read_csv(path):
  with open(path) as f:
    return {row["group"]: row for row in csv.DictReader(f)}


def run_report(capsys, *args):
  status = main([str(a) for a in args])
  captured = capsys.readouterr()
  return status, captured.out, captured.err


PSKD_08 = {"name": "pskd", "alpha_T": 0.8, "refresh": "step"}
PSKD_05 = {"name": "pskd", "alpha_T": 0.5, "refresh": "step"}
BINS = {"count": [0, 2, 3], "confidence_sum": [0.0, 1.0, 2.7], "correct_sum": [0, 1, 3]}


@pytest.fixture
def sweep_root(tmp_path):
  """ce × 3 seeds, pskd α 0.8 × 2 seeds, pskd α 0.5 × 1 seed, one unfinished pskd run."""
  root = tmp_path / "runs"
  ce_last, ce_best = (0.90, 0.91, 0.93), (0.92, 0.915, 0.94)
  for seed, (last, best) in enumerate(zip(ce_last, ce_best)):
    # log_every_steps differs on one seed: a logging key, so it must not split the group.
    make_run(root / "ce" / f"seed{seed}", seed=seed, top1=last, best=best, bins=BINS,
             log_every_steps=50 if seed else 10)
  for seed, last in enumerate((0.92, 0.94)):
    make_run(root / "pskd" / f"seed{seed}", seed=seed, method=PSKD_08, top1=last)
  make_run(root / "pskd+alpha" / "seed0", seed=0, method=PSKD_05, top1=0.95)
  make_run(root / "pskd" / "seed2", seed=2, method=PSKD_08, top1=0.5, finished=False)
  bench = tmp_path / "bench.json"
  bench.write_text(json.dumps([
      {"method": "ce", "model": "lenet5_bn", "dtype": "float32", "batch_size": 128,
       "device": "cpu", "ratio_to_ce": 1.0},
      {"method": "pskd", "model": "lenet5_bn", "dtype": "float32", "batch_size": 128,
       "device": "cpu", "ratio_to_ce": 1.25},
      {"method": "pskd", "model": "resnet18", "dtype": "float32", "batch_size": 128,
       "device": "cpu", "ratio_to_ce": 9.0}]))
  return root, bench


def test_mean_std_n_grouping_last_and_best(sweep_root, tmp_path, capsys):
  root, bench = sweep_root
  out = tmp_path / "report"
  status, stdout, stderr = run_report(capsys, root, "--out", out, "--benchmark", bench)
  assert status == 0, stderr
  assert "report.md" in stdout
  rows = read_csv(out / "report.csv")
  assert list(rows) == ["ce", "pskd (alpha_T=0.5)", "pskd (alpha_T=0.8)"]

  ce = rows["ce"]
  assert ce["n"] == "3" and ce["seeds"] == "0 1 2"
  assert float(ce["top1_last_mean"]) == pytest.approx((0.90 + 0.91 + 0.93) / 3, abs=1e-15)
  assert float(ce["top1_last_std"]) == pytest.approx(sample_std([0.90, 0.91, 0.93]), rel=1e-12)
  assert float(ce["top1_best_mean"]) == pytest.approx((0.92 + 0.915 + 0.94) / 3, abs=1e-15)
  assert float(ce["top1_best_std"]) == pytest.approx(sample_std([0.92, 0.915, 0.94]),
                                                     rel=1e-12)
  assert float(ce["ece_mean"]) == pytest.approx(0.04, abs=1e-15)   # 0.02, 0.04, 0.06
  assert float(ce["ece_std"]) == pytest.approx(0.02, rel=1e-12)
  assert float(ce["wall_s_mean"]) == 101.0 and float(ce["wall_s_std"]) == 1.0
  assert float(ce["step_time_ratio_to_ce"]) == 1.0

  pskd = rows["pskd (alpha_T=0.8)"]  # the unfinished seed 2 is not counted
  assert pskd["n"] == "2" and pskd["seeds"] == "0 1"
  assert float(pskd["top1_last_mean"]) == pytest.approx(0.93, abs=1e-15)
  assert float(pskd["top1_last_std"]) == pytest.approx(math.sqrt(2) * 0.01, rel=1e-12)
  assert float(pskd["step_time_ratio_to_ce"]) == 1.25
  assert pskd["config"] == "method.alpha_T=0.8"

  single = rows["pskd (alpha_T=0.5)"]
  assert single["n"] == "1" and float(single["top1_last_mean"]) == 0.95
  assert single["top1_last_std"] == "" and single["nll_std"] == ""

  report = (out / "report.md").read_text()
  assert "top-1 last (%)" in report and "top-1 best* (%)" in report
  assert "Optimistic" in report and "the test set chooses the epoch" in report
  assert "91.33 ± 1.53" in report  # ce last top-1 in %, sample std
  assert "## Unfinished runs" in report
  unfinished = os.path.join(str(root), "pskd", "seed2")
  assert f"`{unfinished}` (seed 2; evaluated up to epoch 3 of 3)" in report
  assert unfinished in stderr


def _event_images(directory):
  """(tag, width, height) of every image in the TensorBoard event files under `directory`."""
  from tensorboardX.proto import event_pb2
  found = []
  for name in os.listdir(directory):
    data = (directory / name).read_bytes()
    position = 0
    while position < len(data):
      (length,) = struct.unpack("<Q", data[position:position + 8])
      event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      found += [(v.tag, v.image.width, v.image.height) for v in event.summary.value
                if v.HasField("image")]
  return found


def test_plots_and_tensorboard_images(sweep_root, tmp_path, capsys):
  root, bench = sweep_root
  out = tmp_path / "report"
  assert run_report(capsys, root, "--out", out, "--benchmark", bench)[0] == 0
  for name in ("curves", "reliability", "accuracy_vs_step_time"):
    png = (out / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000, name
  tags = {tag for tag, width, height in _event_images(out / "tb") if width and height}
  assert tags == {"report/curves", "report/reliability", "report/accuracy_vs_step_time"}
  report = (out / "report.md").read_text()
  assert "![reliability diagrams](reliability.png)" in report
  # Only ce stored calibration bins: the pskd groups get a note, not a made-up diagram.
  assert "no reliability diagram for pskd (alpha_T=0.8)" in report
  assert "no reliability diagram for ce" not in report


def test_no_bins_no_benchmark_means_no_such_plots(tmp_path, capsys):
  make_run(tmp_path / "runs" / "a", seed=0, top1=0.9)
  out = tmp_path / "out"
  assert run_report(capsys, tmp_path / "runs", "--out", out)[0] == 0
  assert (out / "curves.png").exists()
  assert not (out / "reliability.png").exists()
  assert not (out / "accuracy_vs_step_time.png").exists()
  report = (out / "report.md").read_text()
  assert "reliability diagrams: not drawn" in report
  assert "no reliability diagram for ce: its results.json files have no `test_calibration_bins`" \
      in report
  assert "step time × CE" not in report


def test_mixed_datasets_refused(tmp_path, capsys):
  make_run(tmp_path / "a" / "seed0", seed=0, top1=0.9)
  make_run(tmp_path / "b" / "seed0", seed=0, top1=0.5, dataset="cifar100")
  status, _, stderr = run_report(capsys, tmp_path, "--out", tmp_path / "out")
  assert status == 2
  assert stderr.count("\n") == 1 and "Traceback" not in stderr
  assert "fashion_mnist" in stderr and "cifar100" in stderr
  assert os.path.join(str(tmp_path), "a", "seed0") in stderr
  assert os.path.join(str(tmp_path), "b", "seed0") in stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup", ["empty", "missing", "only_unfinished"])
def test_nothing_to_report_exits_2(tmp_path, capsys, setup):
  target = tmp_path / "runs"
  if setup == "empty":
    (target / "sub").mkdir(parents=True)
  elif setup == "only_unfinished":
    make_run(target / "x", seed=0, finished=False, top1=0.5)
  status, _, stderr = run_report(capsys, target, "--out", tmp_path / "out")
  assert status == 2
  last_line = stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: ") and "Traceback" not in stderr
  expected = {"empty": "no runs", "missing": "is not a directory",
              "only_unfinished": "no finished runs"}[setup]
  assert expected in last_line


def test_corrupt_results_named_and_the_rest_reported(tmp_path, capsys):
  make_run(tmp_path / "runs" / "good", seed=0, top1=0.9)
  make_run(tmp_path / "runs" / "bad", seed=1, top1=0.9)
  (tmp_path / "runs" / "bad" / "results.json").write_text('{"test_top1": 0.9, ')
  make_run(tmp_path / "runs" / "nan", seed=2, top1=0.9)
  (tmp_path / "runs" / "nan" / "results.json").write_text('{"test_top1": "high"}')
  make_run(tmp_path / "runs" / "config", seed=3, top1=0.9)
  (tmp_path / "runs" / "config" / "config.json").write_text('{"seed": 3, ')
  status, _, stderr = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
  assert status == 1
  assert len(stderr.splitlines()) == 3 and "Traceback" not in stderr
  bad = os.path.join(str(tmp_path), "runs", "bad", "results.json")
  assert f"error: {bad} is corrupt" in stderr
  assert "test_top1 is a str ('high'), expected a finite number" in stderr
  assert f"error: {tmp_path / 'runs' / 'config' / 'config.json'} is corrupt" in stderr
  assert read_csv(tmp_path / "out" / "report.csv")["ce"]["n"] == "1"
  report = (tmp_path / "out" / "report.md").read_text()
  assert "## Unreadable runs" in report and bad in report


def test_same_seed_twice_refused(tmp_path, capsys):
  make_run(tmp_path / "one" / "seed0", seed=0, top1=0.9)
  make_run(tmp_path / "two" / "seed0", seed=0, top1=0.9)
  status, _, stderr = run_report(capsys, tmp_path, "--out", tmp_path / "out")
  assert status == 2 and "seed 0 appears twice" in stderr


def test_same_dir_given_twice_counts_once(tmp_path, capsys):
  make_run(tmp_path / "runs" / "seed0", seed=0, top1=0.9)
  status, _, _ = run_report(capsys, tmp_path / "runs", tmp_path / "runs" / "seed0",
                            "--out", tmp_path / "out")
  assert status == 0
  assert read_csv(tmp_path / "out" / "report.csv")["ce"]["n"] == "1"


def test_other_keys_split_groups_and_show_in_labels(tmp_path, capsys):
  make_run(tmp_path / "a", seed=0, top1=0.9, num_epochs=3)
  make_run(tmp_path / "b", seed=0, top1=0.9, num_epochs=30)
  make_run(tmp_path / "c", seed=0, method=PSKD_08, top1=0.9, num_epochs=30)
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  assert list(read_csv(tmp_path / "out" / "report.csv")) == [
      "ce (num_epochs=3)", "ce (num_epochs=30)", "pskd (num_epochs=30)"]


def test_teacher_labels_only_within_the_method(tmp_path, capsys):
  # A nested teacher run config is one key (source#digest); `ce` lacks it and shows nothing,
  # and kd's `method.teacher` keeps its prefix because `teacher` is shown beside it.
  teacher = {"source": "configs/fashion_mnist/ce.py", "config": {"num_epochs": 3}}
  make_run(tmp_path / "ce", seed=0, top1=0.9)
  make_run(tmp_path / "kd_ckpt", seed=0, top1=0.9, teacher=teacher,
           method={"name": "kd", "teacher": "checkpoint"})
  make_run(tmp_path / "kd_reff", seed=0, top1=0.9, method={"name": "kd", "teacher": "reffakd"})
  make_run(tmp_path / "dkd", seed=0, top1=0.9, teacher=teacher, method={"name": "dkd"})
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  labels = list(read_csv(tmp_path / "out" / "report.csv"))
  digest = next(label for label in labels if "#" in label).split("#")[1][:8]
  assert labels == ["ce", "dkd", "kd (method.teacher=reffakd)",
                    f"kd (teacher=configs/fashion_mnist/ce.py#{digest}, "
                    f"method.teacher=checkpoint)"]


def test_exit_accuracies_get_their_own_table(tmp_path, capsys):
  exits = [{"exit1": 0.70, "exit2": 0.80, "ensemble": 0.85},
           {"exit1": 0.72, "exit2": 0.80, "ensemble": 0.87}]
  for seed, exit_top1 in enumerate(exits):
    path = tmp_path / "byot" / f"seed{seed}"
    make_run(path, seed=seed, method={"name": "byot"}, top1=0.9)
    results = json.loads((path / "results.json").read_text())
    (path / "results.json").write_text(json.dumps(dict(results, test_exit_top1=exit_top1)))
  make_run(tmp_path / "ce", seed=0, top1=0.9)
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  rows = read_csv(tmp_path / "out" / "report.csv")
  assert rows["ce"]["exit_top1"] == ""
  byot_exits = json.loads(rows["byot"]["exit_top1"])
  assert list(byot_exits) == ["exit1", "exit2", "ensemble"]
  np.testing.assert_allclose(byot_exits["exit1"], [0.71, np.sqrt(2) * 0.01])
  np.testing.assert_allclose(byot_exits["exit2"][0], 0.80)
  markdown = (tmp_path / "out" / "report.md").read_text()
  table = markdown.split("## Auxiliary exits")[1].split("\n\n## ")[0]
  assert "| method | n | exit1 | exit2 | ensemble |" in table
  assert "| byot | 2 | 71.00 ± 1.41 | 80.00 ± 0.00 | 86.00 ± 1.41 |" in table
  assert "| ce |" not in table


def test_published_number_beside_ours_under_the_papers_protocol(tmp_path, capsys):
  zipf = {"top1": 77.38, "epoch": "best", "source": "zipfls README"}
  pskd = {"top1": 79.18, "epoch": "last", "source": "PS-KD README"}
  for seed, (last, best) in enumerate(((0.760, 0.775), (0.770, 0.781))):
    make_run(tmp_path / "zipf" / f"seed{seed}", seed=seed, method={"name": "zipf"}, top1=last,
             best=best, published=zipf)
  # A corrected published number on one seed does not split the group (a resumable key).
  make_run(tmp_path / "pskd" / "seed0", seed=0, method=PSKD_08, top1=0.79, best=0.80,
           published=pskd)
  make_run(tmp_path / "pskd" / "seed1", seed=1, method=PSKD_08, top1=0.80, best=0.81,
           published=dict(pskd, top1=79.0))
  make_run(tmp_path / "ce", seed=0, top1=0.9)
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  rows = read_csv(tmp_path / "out" / "report.csv")
  assert list(rows) == ["ce", "pskd", "zipf"]
  assert rows["zipf"]["published_top1"] == "77.38" and rows["zipf"]["published_epoch"] == "best"
  assert rows["ce"]["published_top1"] == ""
  table = (tmp_path / "out" / "report.md").read_text().split(
      "## Against the published numbers")[1].split("\n\n## ")[0]
  # Zipf: best epoch, mean of 77.5 and 78.1; PS-KD: last epoch, mean of 79 and 80.
  assert ("| zipf | 2 | 77.38 | best | 77.80 ± 0.42 | +0.42 | zipfls README |" in table), table
  assert "| pskd | 2 | 79.18 | last | 79.50 ± 0.71 | +0.32 | PS-KD README |" in table, table
  assert "| ce |" not in table


def test_host_reading_keys_neither_split_groups_nor_refuse_a_resume(tmp_path, capsys):
  """data.workers and data.reader change how the host reads, not the batches."""
  from selfkd_jax.train import config_check  # pylint: disable=g-import-not-at-top
  data = dict(BASE_CONFIG["data"])
  make_run(tmp_path / "a", seed=0, top1=0.9, data=dict(data, workers=0, reader="threads"))
  make_run(tmp_path / "b", seed=1, top1=0.8, data=dict(data, workers=7, reader="grain"))
  make_run(tmp_path / "c", seed=2, top1=0.7, data=dict(data, workers=7, limit_train=512))
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  rows = read_csv(tmp_path / "out" / "report.csv")
  assert sorted(rows) == ["ce (data.limit_train=0)", "ce (data.limit_train=512)"]
  assert rows["ce (data.limit_train=0)"]["n"] == "2"
  a, b = (json.loads((tmp_path / name / "config.json").read_text()) for name in "ab")
  b["seed"] = a["seed"]
  assert config_check.comparable(a) == config_check.comparable(b)
  assert a["data"]["workers"] == 0  # the caller's dict is untouched


def test_time_is_not_averaged_across_hardware_and_a_partial_mean_says_so(tmp_path, capsys):
  """Runs on 1 and 4 devices (or pmap and shard_map) are one group, since results differ by
  round-off only; their wall time and images/s are not one quantity. A value only some runs
  have is averaged over those and marked."""
  make_run(tmp_path / "a", seed=0, top1=0.9, num_devices=1)
  make_run(tmp_path / "b", seed=1, top1=0.8, num_devices=4)
  make_run(tmp_path / "c", seed=0, top1=0.7, method=dict(PSKD_08))
  make_run(tmp_path / "d", seed=1, top1=0.6, method=dict(PSKD_08))
  results = json.loads((tmp_path / "d" / "results.json").read_text())
  results["images_per_s"] = None  # one logging window: no throughput measured
  (tmp_path / "d" / "results.json").write_text(json.dumps(results))
  assert run_report(capsys, tmp_path, "--out", tmp_path / "out")[0] == 0
  rows = read_csv(tmp_path / "out" / "report.csv")
  assert rows["ce"]["n"] == "2" and float(rows["ce"]["top1_last_mean"]) == (0.9 + 0.8) / 2
  assert rows["ce"]["wall_s_mean"] == rows["ce"]["images_per_s_mean"] == ""
  assert float(rows["pskd"]["images_per_s_mean"]) == 5000.0
  assert float(rows["pskd"]["wall_s_mean"]) == 100.5
  report = (tmp_path / "out" / "report.md").read_text()
  pskd_line = next(line for line in report.splitlines() if line.startswith("| pskd |"))
  assert pskd_line.endswith("| 100 ± 1 | 5000 (1 of 2) |"), pskd_line


def test_ignored_keys_are_the_trainers_resumable_keys():
  from selfkd_jax.train import config_check
  assert set(groups.IGNORED_KEYS) == {"seed", *config_check.RESUMABLE_KEYS}


def test_band_on_different_grids_and_resumed_metrics(tmp_path):
  # Seed b logged every 10 steps, a every 5 and a bit further: the band covers 10..20 only.
  a = ([5, 10, 15, 20, 25], [1.0, 2.0, 3.0, 4.0, 5.0])
  b = ([10, 20], [4.0, 6.0])
  band = curves.band([(np.asarray(x, float), np.asarray(y, float)) for x, y in (a, b)])
  assert band.x.tolist() == [10, 15, 20]
  assert band.mean.tolist() == [3.0, 4.0, 5.0]     # b interpolated to 5.0 at step 15
  assert band.low.tolist() == [2.0, 3.0, 4.0] and band.high.tolist() == [4.0, 5.0, 6.0]

  # A resumed run logs steps again (the later line wins); a crash can cut the last line.
  run = tmp_path / "run"
  make_run(run, seed=0, top1=0.9, train=[
      {"kind": "train", "step": 5, "loss": 9.0}, {"kind": "train", "step": 10, "loss": 8.0},
      {"kind": "train", "step": 5, "loss": 1.0}, {"kind": "eval", "step": 10, "loss": 7.0},
      {"kind": "train", "step": 10, "loss": 2.0}])
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "st')
  x, y = curves.run_series(str(run), "train", "loss")
  assert x.tolist() == [5, 10] and y.tolist() == [1.0, 2.0]


# Bad input files: each leaves out only the bad file (or record) with one line on stderr. A bad
# config.json or results.json makes its run unreadable (status 1, as documented); a bad
# benchmark record, eval_history.json or metrics.jsonl only costs a ratio or a curve (status 0).
GOOD_RECORD = {"method": "ce", "model": "lenet5_bn", "dtype": "float32", "batch_size": 128,
               "device": "cpu", "ratio_to_ce": 1.0}


def _edit_json(path, **changes):
  path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


BAD_INPUTS = {
    # name: (file, how to spoil it, status, what the line says)
    "benchmark_record_wrong_type": (
        "bench.json", lambda p: p.write_text(json.dumps([dict(GOOD_RECORD, ratio_to_ce="fast"),
                                                         GOOD_RECORD])),
        0, "record 1: ratio_to_ce is a str ('fast'), expected a finite number"),
    "config_data_not_a_mapping": (
        "runs/bad/config.json", lambda p: _edit_json(p, data="fashion_mnist"),
        1, "data is a str ('fashion_mnist'), expected a mapping"),
    "config_model_not_a_mapping": (
        "runs/bad/config.json", lambda p: _edit_json(p, model="lenet5_bn"),
        1, "model is a str ('lenet5_bn'), expected a mapping"),
    "config_batch_size_a_string": (
        "runs/bad/config.json", lambda p: _edit_json(p, batch_size="128"),
        1, "batch_size is a str ('128'), expected an integer"),
    "results_exits_not_a_mapping": (
        "runs/bad/results.json", lambda p: _edit_json(p, test_exit_top1=[0.7, 0.8]),
        1, "test_exit_top1 is a list ([0.7, 0.8]), expected a mapping"),
    "results_exit_a_string": (
        "runs/bad/results.json", lambda p: _edit_json(p, test_exit_top1={"exit1": "high"}),
        1, "test_exit_top1.exit1 is a str ('high'), expected a finite number"),
    "eval_history_unparsable": (
        "runs/bad/eval_history.json", lambda p: p.write_text('[{"epoch": 1, '),
        0, "Expecting"),
    "eval_history_bad_entry": (
        "runs/bad/eval_history.json",
        lambda p: p.write_text(json.dumps([{"epoch": "one", "top1": 0.5}, {"epoch": 2}])),
        0, "1 of 2 records in"),
    "metrics_unparsable": (
        "runs/bad/metrics.jsonl", lambda p: p.write_text("step 5: loss 2.0\nstep 10\n"),
        0, "no line is JSON"),
    "metrics_not_utf8": (
        "runs/bad/metrics.jsonl", lambda p: p.write_bytes(b'{"kind": "train", "step": 5}\n\xff'),
        0, "can't decode byte 0xff"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_file_is_one_line_and_the_rest_is_reported(tmp_path, capsys, case):
  relative, spoil, expected_status, expected_text = BAD_INPUTS[case]
  good = tmp_path / "runs" / "good"
  make_run(good, seed=0, top1=0.9)
  make_run(tmp_path / "runs" / "bad", seed=1, top1=0.8)
  bench = tmp_path / "bench.json"
  bench.write_text(json.dumps([GOOD_RECORD]))
  spoil(tmp_path / relative)
  out = tmp_path / "out"
  status, _, stderr = run_report(capsys, tmp_path / "runs", "--out", out, "--benchmark", bench)
  assert status == expected_status, stderr
  assert "Traceback" not in stderr
  bad_path = str(tmp_path / relative)
  [line] = stderr.splitlines()  # exactly one line, and it names the file and the problem
  assert bad_path in line and expected_text in line, line
  report = (out / "report.md").read_text()
  assert f"`{good}`" in report and (out / "report.csv").exists() and (out / "curves.png").exists()
  rows = read_csv(out / "report.csv")
  assert float(rows["ce"]["step_time_ratio_to_ce"]) == 1.0  # the good record still counts
  if expected_status == 1:  # the run is left out and listed
    assert rows["ce"]["n"] == "1" and "## Unreadable runs" in report and bad_path in report
  else:  # the run counts; only a curve (or a benchmark record) is missing
    assert rows["ce"]["n"] == "2"
