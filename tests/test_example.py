"""The examples: Flax Linen and NNX loops with one method of each family, and a plain-JAX loop.

Each (loop, method) trains once on a subset (2 epochs of 2000 training images, batch 128, so
15 steps per epoch and 80 examples left out of every epoch; 1000 test images), cached for the
module; the tests then check what a wrong integration would break.
"""
import ast
import functools
import os
import re
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
sys.path.insert(0, EXAMPLES)

import flax_linen_fashion_mnist as linen_example  # pylint: disable=g-import-not-at-top
import flax_nnx_fashion_mnist as nnx_example  # pylint: disable=g-import-not-at-top

from selfkd_jax import heads  # pylint: disable=g-import-not-at-top

LOOPS = {"linen": linen_example, "nnx": nnx_example}
EXAMPLE_FILES = ("flax_linen_fashion_mnist.py", "flax_nnx_fashion_mnist.py", "own_loop_pskd.py",
                 "fashion_mnist_data.py")
LIMIT_TRAIN, LIMIT_TEST, BATCH_SIZE, NUM_EPOCHS, SEED = 2000, 1000, 128, 2, 0
STEPS_PER_EPOCH = LIMIT_TRAIN // BATCH_SIZE  # 15
FAMILIES = ("targets", "snapshot", "partner", "head", "teacher")
# What `pip install -e .` does not install, and the parts of selfkd_jax that import it (the
# trainer and the data pipeline): none may be imported.
FORBIDDEN = ("grain", "tensorflow", "tensorflow_datasets", "sklearn", "ml_collections", "orbax",
             "selfkd_jax.train", "selfkd_jax.data")
# Test accuracy after 2 epochs on 2000 images, measured 0.61-0.80 (every loop and method,
# seeds 0-2; chance is 0.1): a loss that does not reach the model, or an evaluation of the
# wrong variables, falls far below.
MIN_ACCURACY = 0.5



def _forbidden(modules):
  return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def _numpy_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.cache
def _data():
  return linen_example.load_fashion_mnist(limit_train=LIMIT_TRAIN, limit_test=LIMIT_TEST)


@functools.cache
def _run(loop, method):
  """Trains once per (loop, method): a dict with the summary, final state and, for KD, teacher."""
  train_ds, test_ds = _data()
  kwargs = dict(num_epochs=NUM_EPOCHS, batch_size=BATCH_SIZE, seed=SEED)
  result = {}
  if method == "kd":  # the CE run is the teacher, as a user would reuse a trained model
    ce = _run(loop, "ce")
    if loop == "linen":
      kwargs["teacher"] = (linen_example.CNN(), {"params": ce["state"].params,
                                                 "batch_stats": ce["state"].batch_stats})
      result["teacher_before"] = _numpy_copy(kwargs["teacher"][1])
    else:
      kwargs["teacher"] = ce["model"]
      result["teacher_before"] = _numpy_copy(nnx.state(ce["model"]))
    result["teacher"] = kwargs["teacher"]
  if loop == "linen":
    state, summary = linen_example.train_and_evaluate(method, train_ds, test_ds, **kwargs)
    result.update(state=state, method_state=state.method_state,
                  trained_params=heads.parameter_count(state.params))
  else:
    model, method_state, summary = nnx_example.train_and_evaluate(method, train_ds, test_ds,
                                                                  **kwargs)
    result.update(model=model, method_state=method_state,
                  trained_params=heads.parameter_count(nnx.state(model, nnx.Param)))
  result["summary"] = summary
  return result


def _visited_indices():
  """The examples the loops visit: rows of `default_rng(seed).permutation(N)`, remainder dropped."""
  rng = np.random.default_rng(SEED)
  visited = [rng.permutation(LIMIT_TRAIN)[:STEPS_PER_EPOCH * BATCH_SIZE]
             for _ in range(NUM_EPOCHS)]
  return np.unique(np.concatenate(visited))


@pytest.mark.parametrize("method", linen_example.METHODS)
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_loop_trains_and_evaluates(loop, method):
  summary = _run(loop, method)["summary"]
  loss = summary["train_loss"]
  assert loss.shape == (NUM_EPOCHS * STEPS_PER_EPOCH,)
  assert np.all(np.isfinite(loss)), loss
  # The gradient reaches the model through the method's loss: the end of the first epoch
  # (targets still one-hot for PS-KD, no snapshot yet for MrKD) well below step 0, and the
  # last epoch still below it (PS-KD's alpha 0.8 there makes its targets, so its loss, softer).
  assert loss[STEPS_PER_EPOCH - 5:STEPS_PER_EPOCH].mean() < 0.8 * loss[0], loss
  assert loss[-STEPS_PER_EPOCH:].mean() < loss[0], loss
  # Train-mode accuracy of the last epoch's batches, measured 0.59-0.77 (chance 0.1).
  assert summary["metrics"]["accuracy"].mean() > 0.4
  accuracy = summary["test_accuracy"][-1]
  assert np.isfinite(summary["test_loss"][-1])
  assert accuracy > MIN_ACCURACY, (loop, method, summary["test_accuracy"])


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_pskd_writes_exactly_the_visited_rows(loop):
  rows = np.asarray(_run(loop, "pskd")["method_state"].past_predictions.rows)
  assert rows.shape == (LIMIT_TRAIN, 10)
  written = np.flatnonzero(np.any(rows != 0, axis=1))
  visited = _visited_indices()
  assert 0 < len(visited) < LIMIT_TRAIN  # some examples were never in a full batch
  np.testing.assert_array_equal(written, visited)
  np.testing.assert_allclose(rows[written].sum(axis=1), 1.0, rtol=1e-5)  # softmax rows
  # Each past prediction mostly agrees with its label, so the rows are keyed by the dataset
  # index (a row written under the batch position would match its label only by chance).
  labels = _data()[0]["label"]
  assert np.mean(np.argmax(rows[written], axis=1) == labels[written]) > 0.5
  np.testing.assert_allclose(_run(loop, "pskd")["summary"]["metrics"]["pskd_alpha"], 0.8)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_mrkd_takes_one_snapshot_per_epoch(loop):
  run = _run(loop, "mrkd")
  state = run["method_state"]
  # Refreshes at steps 15, 30, ...: after 30 steps exactly one snapshot (K = 1) was taken.
  assert int(state.num_filled) == 1
  metrics = run["summary"]["metrics"]  # the last epoch, steps 15..29: snapshot from step 15 on
  np.testing.assert_array_equal(metrics["mrkd_snapshots"], 1.0)
  np.testing.assert_array_equal(metrics["mrkd_active"], 1.0)
  assert metrics["mrkd_teacher_accuracy"].mean() > 0.5  # an eval-mode model after 1 epoch
  snapshot = jax.tree.map(lambda x: np.asarray(x[0]), state.snapshots)
  if loop == "linen":
    current = {"params": run["state"].params, "batch_stats": run["state"].batch_stats}
  else:
    current = nnx.to_pure_dict(nnx.state(run["model"], nnx.Any(nnx.Param, nnx.BatchStat)))
  assert jax.tree.structure(snapshot) == jax.tree.structure(current)
  for old, new in zip(jax.tree.leaves(snapshot), jax.tree.leaves(current)):
    assert old.shape == new.shape
    assert np.any(old != 0)  # written: weights and BatchNorm statistics alike
  # The snapshot is from step 15, not the current variables.
  assert any(np.any(o != np.asarray(n))
             for o, n in zip(jax.tree.leaves(snapshot), jax.tree.leaves(current)))


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_cskd_partners_share_the_label_and_differ(loop):
  example = LOOPS[loop]
  train_ds, _ = _data()
  partners = example.partners_lib.SameClassPartners(train_ds["label"], seed=SEED)
  anchors = np.random.default_rng(1).permutation(LIMIT_TRAIN)[:BATCH_SIZE]
  batch = example.get_batch(train_ds, anchors, 7, partners)
  chosen = partners.partners(anchors, 7)
  np.testing.assert_array_equal(batch["partner_image"], train_ds["image"][chosen])
  np.testing.assert_array_equal(train_ds["label"][chosen], batch["label"])
  assert np.all(chosen != anchors)
  # The host step counter draws afresh every step.
  assert np.mean(partners.partners(anchors, 8) != chosen) > 0.9
  assert "partner_image" not in example.get_batch(train_ds, anchors, 7)
  metrics = _run(loop, "cskd")["summary"]["metrics"]
  assert np.all(metrics["cskd_distill"] > 0)  # the partner pass ran and differs from anchors


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_ras_kd_trains_a_head_but_evaluates_the_backbone(loop):
  run, ce = _run(loop, "ras_kd"), _run(loop, "ce")
  head_params = linen_example.FEATURE_DIM * 10 + 10
  assert run["summary"]["eval_param_count"] == ce["summary"]["eval_param_count"]
  assert run["trained_params"] == ce["trained_params"] + head_params
  metrics = run["summary"]["metrics"]
  np.testing.assert_array_equal(metrics["ras_ready"], 1.0)
  assert metrics["ras_aux_accuracy"].mean() > 0.5  # the head is trained by the one optimizer


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_kd_leaves_the_teacher_unchanged(loop):
  run = _run(loop, "kd")
  after = run["teacher"][1] if loop == "linen" else nnx.state(run["teacher"])
  # NNX: the teacher is a module the student's step receives; no BatchNorm update may reach it.
  _assert_trees_equal(run["teacher_before"], _numpy_copy(after))
  assert run["summary"]["metrics"]["kd_distill"].mean() > 0


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_examples_import_only_the_core_install(name):
  """Every import at the top, of the standard library, jax, flax, optax, numpy or selfkd_jax."""
  with open(os.path.join(EXAMPLES, name)) as f:
    tree = ast.parse(f.read())
  top_level = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      assert node in tree.body, f"{name}:{node.lineno}: import inside a function"
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
      top_level.update(n.split(".")[0] for n in names)
      if isinstance(node, ast.ImportFrom) and node.module == "selfkd_jax":
        assert {a.name for a in node.names} <= {"adapters", "heads", "methods", "partners"}
  # fashion_mnist_data: the examples' shared numpy reader (checked here as an example too).
  allowed = ({"jax", "flax", "optax", "numpy", "selfkd_jax", "fashion_mnist_data"}
             | set(sys.stdlib_module_names))
  assert top_level <= allowed, top_level - allowed


def test_runs_imported_nothing_outside_the_core_install():
  """Nothing the runs called imported a forbidden module lazily (see also the subprocess).

  Compared with the modules present when this test starts, not when the file was imported:
  under pytest-xdist other test files run in this process in between and import the trainer.
  """
  before = set(sys.modules)
  for loop in LOOPS:
    for method in linen_example.METHODS:
      _run(loop, method)
  assert not _forbidden(set(sys.modules) - before)


PROBE = """
import sys
sys.path.insert(0, "examples")
import own_loop_pskd
accuracy, state, visited = own_loop_pskd.main(num_epochs=3, limit_train=2000, limit_test=1000)
written = (state.past_predictions.rows != 0).any(axis=1).nonzero()[0]
print("ACCURACY", accuracy)
print("ROWS_MATCH", len(written) == len(visited) and bool((written == visited).all()))
print("PLAIN_MODULES", ",".join(sorted(sys.modules)))
import flax_linen_fashion_mnist, flax_nnx_fashion_mnist
print("MODULES", ",".join(sorted(sys.modules)))
"""


def test_plain_jax_loop_and_clean_imports_in_a_fresh_process():
  result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
  assert float(lines["ACCURACY"]) > 0.6  # 1000 test images, chance 0.1; 0.74-0.76 (seeds 0-2)
  assert lines["ROWS_MATCH"] == "True"
  plain = lines["PLAIN_MODULES"].split(",")
  assert "selfkd_jax.methods" in plain
  assert not [m for m in plain if m == "flax" or m.startswith("flax.")]  # plain JAX
  modules = lines["MODULES"].split(",")
  assert not _forbidden(modules), _forbidden(modules)


def _family_lines(name):
  with open(os.path.join(EXAMPLES, name)) as f:
    source = f.read()
  return {family: len(re.findall(rf"# \[{family}\]$", source, re.M))
          for family in FAMILIES + ("hooks",)}


@pytest.mark.parametrize("name", EXAMPLE_FILES[:2])
def test_each_family_takes_a_few_tagged_lines(name):
  """Tags count the lines each family adds or changes in the CE loop (see the docstrings)."""
  counts = _family_lines(name)
  print(name, counts)
  for family in FAMILIES:
    assert 1 <= counts[family] <= 20, (family, counts)
  assert 1 <= counts["hooks"] <= 3
