"""BYOT: auxiliary exits (models/exits.py) and the BYOT transform (methods/byot.py).

Numeric tests use synthetic LeNet-5-BN-shaped outputs (stage maps 14×14×6 and 5×5×16,
84-d features, 10 classes, batch 8) so every compiled function stays small; the ResNet-18
checks only trace (`jax.eval_shape`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax.methods.byot import ByotState, byot
from selfkd_jax.models import CifarResNet, LeNet5BN, PreActResNet
from selfkd_jax.models.exits import (Exits, backbone_exit_kwargs, exit_plan, init_exits,
                                     make_exits, stage_feature_shapes)
from numpy_reference import log_softmax

B, C, D = 8, 10, 84
LENET_STAGES = ((14, 14, 6), (5, 5, 16))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _sepconv_params(cin, cout):
  # dw3x3 + pw1x1 (cin->cin) + BN(cin) + dw3x3 + pw1x1 (cin->cout) + BN(cout)
  return 9 * cin + cin * cin + 2 * cin + 9 * cin + cin * cout + 2 * cout


# ----------------------------------------------------------------------------- exits


def test_resnet18_exit_shapes_and_official_architecture():
  model = CifarResNet(num_classes=100)
  shapes = stage_feature_shapes(model, (32, 32, 3))
  assert [s.shape for s in shapes] == [(1, 32, 32, 64), (1, 16, 16, 128), (1, 8, 8, 256),
                                       (1, 4, 4, 512)]
  assert exit_plan(shapes, 0) == ((128, 2), (256, 2), (512, 2))
  assert exit_plan(shapes, 2) == ((512, 2),)
  exits = make_exits("byot", shapes, 512, 100)
  assert exits.exit_stages == (0, 1, 2) and exits.names == ("exit1", "exit2", "exit3")
  variables = jax.eval_shape(lambda: init_exits(exits))
  batch = tuple(jax.ShapeDtypeStruct((3, *s.shape[1:]), jnp.float32) for s in shapes)
  logits, feats = jax.eval_shape(lambda v, s: exits.apply(v, s, train=False), variables, batch)
  assert [z.shape for z in logits] == [(3, 100)] * 3
  assert [f.shape for f in feats] == [(3, 512)] * 3
  assert all(z.dtype == jnp.float32 for z in logits + feats)
  # Exit 3 = the official attention3 (SepConv 256->256 + BN) and scala3 (SepConv 256->512),
  # fc3 (512->100) and one adaptation layer (512->512).
  expected = (_sepconv_params(256, 256) + 2 * 256 + _sepconv_params(256, 512)
              + 512 * 100 + 100)
  assert _count(variables["params"]["exit3"]) == expected
  assert _count(variables["params"]["adapter3"]) == 512 * 512 + 512
  expected1 = (_sepconv_params(64, 64) + 2 * 64 + _sepconv_params(64, 128)
               + _sepconv_params(128, 256) + _sepconv_params(256, 512) + 512 * 100 + 100)
  assert _count(variables["params"]["exit1"]) == expected1


def test_hsakd_exits_copy_the_later_stages():
  model = CifarResNet(num_classes=100)
  shapes = stage_feature_shapes(model, (32, 32, 3))
  kwargs = backbone_exit_kwargs(model)
  assert kwargs == {"block": "basic", "blocks_per_stage": (2, 2, 2, 2)}
  exits = make_exits("hsakd", shapes, 512, 100, **kwargs)
  assert exits.exit_stages == (0, 1, 2, 3)  # HSAKD also has a head on the last stage
  variables = jax.eval_shape(lambda: init_exits(exits))
  params = variables["params"]
  fc = 512 * 400 + 400  # 4C joint (rotation) classes
  # Copies of stages 2-4 of ResNet-18 (their documented counts) + the joint classifier.
  assert _count(params["exit1"]) == 525_568 + 2_099_712 + 8_393_728 + fc
  assert _count(params["exit3"]) == 8_393_728 + fc
  # Head 4: a stride-1 copy of stage 4 (no projection shortcut): 2 blocks of 2 convs + 2 BN.
  assert _count(params["exit4"]) == 2 * (2 * 9 * 512 * 512 + 2 * 2 * 512) + fc
  batch = tuple(jax.ShapeDtypeStruct((2, *s.shape[1:]), jnp.float32) for s in shapes)
  logits, feats = jax.eval_shape(lambda v, s: exits.apply(v, s, train=False), variables, batch)
  assert [z.shape for z in logits] == [(2, 400)] * 4 and [f.shape for f in feats] == [(2, 512)] * 4
  assert backbone_exit_kwargs(PreActResNet(num_classes=10))["block"] == "preact"


def test_lenet_exit_shapes_and_model_parameter_count_unchanged():
  model = LeNet5BN(num_classes=C)
  shapes = stage_feature_shapes(model, (28, 28, 1))
  assert tuple(s.shape[1:] for s in shapes) == LENET_STAGES
  exits = make_exits("byot", shapes, D, C)
  assert exits.exit_stages == (0,) and exit_plan(shapes, 0) == ((16, 2),)
  method = byot(exits)
  state = jax.eval_shape(method.init, jax.random.PRNGKey(0))
  assert isinstance(state, ByotState)
  exit_vars = jax.eval_shape(lambda: init_exits(exits))
  # The exits (and their adapter 16 -> 84) live in the method state, not in the model.
  assert _count(state.exit_params) == _count(exit_vars["params"]) > 0
  assert _count(state.exit_params["adapter1"]) == 16 * D + D
  model_vars = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                              jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
  assert _count(model_vars["params"]) == 61_728  # LeNet-5-BN's documented count
  hsakd = make_exits("hsakd", shapes, D, C, **backbone_exit_kwargs(model))
  hv = jax.eval_shape(lambda: init_exits(hsakd))
  logits, feats = jax.eval_shape(
      lambda v, s: hsakd.apply(v, s, train=False), hv,
      tuple(jax.ShapeDtypeStruct((B, *s), jnp.float32) for s in LENET_STAGES))
  assert [z.shape for z in logits] == [(B, 4 * C)] * 2 and [f.shape for f in feats] == [(B, D)] * 2


def test_constructor_validation():
  with pytest.raises(ValueError, match="kind"):
    make_exits("nope", LENET_STAGES, D, C)
  with pytest.raises(ValueError, match="no exit"):
    make_exits("byot", LENET_STAGES[:1], D, C)
  with pytest.raises(ValueError, match="adapters=False"):
    make_exits("byot", LENET_STAGES, D, C, adapters=False)
  with pytest.raises(ValueError, match="attention"):
    make_exits("hsakd", LENET_STAGES, D, C, attention=True)
  exits = make_exits("byot", LENET_STAGES, D, C)
  for kwargs, word in [({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature"),
                       ({"feature_weight": -1.0}, "feature_weight"),
                       ({"variant": "x"}, "variant"), ({"feature_norm": "x"}, "feature_norm"),
                       ({"feature_exits": (2,)}, "feature_exits")]:
    with pytest.raises(ValueError, match=word):
      byot(exits, **kwargs)
  with pytest.raises(ValueError, match="Exits"):
    byot(object())


# ----------------------------------------------------------------------------- method


@pytest.fixture(scope="module")
def setup():
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  outputs = {
      "logits": 2.0 * jax.random.normal(keys[0], (B, C)),
      "features": jax.nn.relu(jax.random.normal(keys[1], (B, D))),
      "stage_features": (jax.nn.relu(jax.random.normal(keys[2], (B, 14, 14, 6))),
                         jax.nn.relu(jax.random.normal(keys[3], (B, 5, 5, 16)))),
  }
  labels = jnp.arange(B) % C
  exits = make_exits("byot", LENET_STAGES, D, C)  # official layout: attention + SepConv
  methods = {"journal": byot(exits, feature_norm="example"),
             "conference": byot(exits, variant="conference", feature_norm="example"),
             "batch": byot(exits, feature_norm="batch")}
  state = jax.jit(methods["journal"].init)(jax.random.PRNGKey(1))

  @jax.jit
  def run(state, outputs, labels):
    results = {name: m.update(state, outputs, {"label": labels}, step=0)
               for name, m in methods.items()}
    (z, a), _ = exits.apply({"params": state.exit_params, "batch_stats": state.exit_batch_stats},
                            outputs["stage_features"], train=True, mutable=["batch_stats"])
    return results, z[0], a[0]

  results, exit_z, exit_a = run(state, outputs, labels)
  return dict(outputs=outputs, labels=labels, exits=exits, methods=methods, state=state,
              run=run, results=results, exit_z=exit_z, exit_a=exit_a)


def test_loss_matches_numpy_for_both_variants(setup):
  z = np.asarray(setup["outputs"]["logits"], np.float64)
  f = np.asarray(setup["outputs"]["features"], np.float64)
  y = np.asarray(setup["labels"])
  zi = np.asarray(setup["exit_z"], np.float64)
  ai = np.asarray(setup["exit_a"], np.float64)
  rows = np.arange(B)
  ce_deep = -log_softmax(z)[rows, y]
  ce_exit = -log_softmax(zi)[rows, y]
  teacher = np.exp(log_softmax(z / 3.0))
  soft_ce = -(teacher * log_softmax(zi / 3.0)).sum(-1)
  sq = ((ai - f) ** 2).sum(-1)
  expected = {
      "journal": ce_deep + 0.7 * ce_exit + 0.3 * soft_ce + 0.03 * np.sqrt(sq),
      "conference": ce_deep + 0.7 * ce_exit + 0.3 * 9.0 * soft_ce + 0.03 * sq,
      # torch.dist over the batch: every example carries the Frobenius norm.
      "batch": ce_deep + 0.7 * ce_exit + 0.3 * soft_ce + 0.03 * np.sqrt(sq.sum()),
  }
  for name, want in expected.items():
    loss, _, metrics = setup["results"][name]
    assert loss.shape == (B,)
    np.testing.assert_allclose(loss, want, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(metrics["byot_exit_ce"], ce_exit.mean(), rtol=2e-5)
    np.testing.assert_allclose(metrics["byot_exit1_accuracy"],
                               np.mean(zi.argmax(-1) == y), atol=1e-7)
  assert not np.allclose(expected["journal"], expected["batch"])
  np.testing.assert_allclose(setup["results"]["journal"][2]["byot_feature_loss"],
                             np.sqrt(sq).mean(), rtol=2e-5)
  np.testing.assert_allclose(setup["results"]["conference"][2]["byot_distill"],
                             9.0 * soft_ce.mean(), rtol=2e-5)


def test_gradients_stop_at_the_teacher_and_reach_the_backbone_and_exits(setup):
  method, state, labels = setup["methods"]["journal"], setup["state"], setup["labels"]

  @jax.jit
  def grads(exit_params, outputs):
    def mean_loss(exit_params, outputs):
      s = state._replace(exit_params=exit_params)
      return jnp.mean(method.update(s, outputs, {"label": labels}, step=0)[0])
    return jax.grad(mean_loss, argnums=(0, 1))(exit_params, outputs)

  g_exit, g_out = grads(state.exit_params, setup["outputs"])
  # Deepest logits: only CE(z) reaches them (softmax - onehot) / B; nothing from the teacher.
  probs = jax.nn.softmax(setup["outputs"]["logits"])
  np.testing.assert_allclose(g_out["logits"], (probs - jax.nn.one_hot(labels, C)) / B,
                             atol=1e-6)
  np.testing.assert_array_equal(g_out["features"], 0.0)  # deepest features: sg
  assert float(jnp.abs(g_out["stage_features"][0]).max()) > 0.0  # through the exit
  np.testing.assert_array_equal(g_out["stage_features"][1], 0.0)  # no exit on the last stage
  # The exit step uses exactly the gradient of the returned loss w.r.t. the exits: the first
  # step of sgd(0.1, momentum=0.9) moves the parameters by -0.1 * grad.
  new_state = setup["results"]["journal"][1]
  moved = jax.tree.map(lambda new, old: new - old, new_state.exit_params, state.exit_params)
  for m, g in zip(jax.tree.leaves(moved), jax.tree.leaves(g_exit)):
    np.testing.assert_allclose(m, -0.1 * g, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_exit["adapter1"]["kernel"]).max()) > 0.0


def test_exit_step_lowers_the_exit_loss_and_updates_batch_stats(setup):
  run, outputs, labels = setup["run"], setup["outputs"], setup["labels"]
  state = setup["state"]
  deep_ce = np.asarray(-jax.nn.log_softmax(outputs["logits"])[jnp.arange(B), labels])
  loss0, state1, _ = setup["results"]["journal"]
  results1, _, _ = run(state1, outputs, labels)
  loss1 = results1["journal"][0]
  assert float(jnp.mean(loss1 - deep_ce)) < float(jnp.mean(loss0 - deep_ce))
  # BN statistics moved in train mode and are what exit_logits uses (eval mode).
  stats0 = jax.tree.leaves(state.exit_batch_stats)
  stats1 = jax.tree.leaves(state1.exit_batch_stats)
  assert all(not np.allclose(a, b) for a, b in zip(stats0, stats1))
  exit_logits = jax.jit(setup["methods"]["journal"].exit_logits)
  with_new = exit_logits(state1, outputs)
  with_old = exit_logits(state1._replace(exit_batch_stats=state.exit_batch_stats), outputs)
  assert set(with_new) == {"exit1"} and with_new["exit1"].shape == (B, C)
  assert not np.allclose(with_new["exit1"], with_old["exit1"])
  manual, _ = setup["exits"].apply(
      {"params": state1.exit_params, "batch_stats": state1.exit_batch_stats},
      outputs["stage_features"], train=False)
  np.testing.assert_allclose(with_new["exit1"], manual[0], rtol=1e-5, atol=1e-6)


@pytest.mark.cross_device
def test_four_devices_match_one_device(setup):
  """shard_map over 4 devices (cross-device exit BN, pmean'd exit gradients, the batch norm's
  psum) gives the single-device result on the same global batch."""
  method = setup["methods"]["batch"]
  state, outputs, labels = setup["state"], setup["outputs"], setup["labels"]

  def step(state, outputs, labels, axis_name):
    return method.update(state, outputs, {"label": labels}, step=0,
                         axis_name=axis_name)

  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  sharded = jax.jit(jax.shard_map(
      functools.partial(step, axis_name="data"), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P(), P()),
      check_vma=False))
  loss_4, state_4, metrics_4 = sharded(state, outputs, labels)
  loss_1, state_1, _ = setup["results"]["batch"]
  roundoff.assert_close_to_scale(loss_4, loss_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.STEP_RTOL)
  assert set(metrics_4) == set(setup["results"]["batch"][2])
