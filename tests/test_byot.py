"""BYOT: auxiliary exits (models/exits.py), attached as a head (heads.ExitHead), and the loss
(methods/byot.py).

Numeric tests run LeNet-5-BN (stage maps 14×14×6 and 5×5×16, 84-d features, 10 classes) with
BYOT's exit on its first stage attached by `heads.with_heads`, on a batch of 8 random 28×28
images; the caller's step is one `jax.value_and_grad` of the mean loss over the wrapped
model's parameters. The ResNet-18 checks only trace (`jax.eval_shape`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax import heads
from selfkd_jax.methods import EmptyState
from selfkd_jax.methods.byot import byot
from selfkd_jax.models import CifarResNet, LeNet5BN, PreActResNet
from selfkd_jax.models.exits import (backbone_exit_kwargs, exit_plan, init_exits, make_exits,
                                     stage_feature_shapes)
from numpy_reference import log_softmax, softmax

B, C, D = 8, 10, 84
IMAGE = (28, 28, 1)
LENET_STAGES = ((14, 14, 6), (5, 5, 16))
ALPHA, T, LAMBDA = 0.3, 3.0, 0.03  # byot's defaults
# The three losses the numeric tests check: journal/conference with per-example feature norms,
# and the default (journal, torch.dist over the whole batch).
VARIANTS = {"journal": dict(feature_norm="example"),
            "conference": dict(variant="conference", feature_norm="example"),
            "batch": {}}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _sepconv_params(cin, cout):
  # dw3x3 + pw1x1 (cin->cin) + BN(cin) + dw3x3 + pw1x1 (cin->cout) + BN(cout)
  return 9 * cin + cin * cin + 2 * cin + 9 * cin + cin * cout + 2 * cout


def _one_line_error(excinfo, *words):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for word in words:
    assert word in message, message


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


def test_lenet_exits_are_a_head_and_the_backbone_keeps_its_parameter_count():
  backbone = LeNet5BN(num_classes=C)
  shapes = stage_feature_shapes(backbone, IMAGE)
  assert tuple(s.shape[1:] for s in shapes) == LENET_STAGES
  exits = make_exits("byot", shapes, D, C)
  assert exits.exit_stages == (0,) and exit_plan(shapes, 0) == ((16, 2),)
  head = heads.ExitHead(exits)
  assert heads.exit_head_for("byot", backbone, IMAGE, C) == head
  model = heads.with_heads(backbone, head)
  image = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), image)
  assert set(variables["params"]) == set(variables["batch_stats"]) == {"backbone", "heads_0"}
  # The exits (and their adapter 16 -> 84) are the head's variables, not the backbone's.
  exit_vars = jax.eval_shape(lambda: init_exits(exits))
  for collection in ("params", "batch_stats"):
    assert (jax.tree.structure(variables[collection]["heads_0"]["exits"])
            == jax.tree.structure(exit_vars[collection]))
  assert _count(variables["params"]["heads_0"]) == _count(exit_vars["params"]) > 0
  assert _count(variables["params"]["heads_0"]["exits"]["adapter1"]) == 16 * D + D
  alone = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), image)
  assert _count(variables["params"]["backbone"]) == _count(alone["params"]) == 61_728
  # The method keeps nothing: no exits' variables, no optimizer state.
  assert byot().init(jax.random.PRNGKey(0)) == EmptyState()
  hsakd = make_exits("hsakd", shapes, D, C, **backbone_exit_kwargs(backbone))
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
  for kwargs, word in [({"alpha": 1.5}, "alpha"), ({"temperature": 0.0}, "temperature"),
                       ({"feature_weight": -1.0}, "feature_weight"),
                       ({"variant": "x"}, "variant"), ({"feature_norm": "x"}, "feature_norm"),
                       ({"feature_exits": (0,)}, "feature_exits"),
                       ({"feature_exits": ()}, "feature_exits")]:
    with pytest.raises(ValueError, match=word) as excinfo:
      byot(**kwargs)
    _one_line_error(excinfo, "byot")


def _synthetic_outputs(num_exits, seed=0, classes=C, width=D):
  rng = np.random.default_rng(seed)
  return {
      "logits": jnp.asarray(2.0 * rng.normal(size=(B, C)), jnp.float32),
      "features": jnp.asarray(np.maximum(rng.normal(size=(B, D)), 0), jnp.float32),
      "exit_logits": tuple(jnp.asarray(2.0 * rng.normal(size=(B, classes)), jnp.float32)
                           for _ in range(num_exits)),
      "exit_features": tuple(jnp.asarray(rng.normal(size=(B, width)), jnp.float32)
                             for _ in range(num_exits)),
  }


def _trace_update(method, outputs):
  batch = {"label": jnp.arange(B) % C}
  return jax.eval_shape(lambda o: method.update(EmptyState(), o, batch, step=0), outputs)


def test_update_errors_are_one_line():
  one_exit = _synthetic_outputs(1)
  # feature_exits are checked against the model's exits when update is traced.
  for feature_exits in [(2,), (1, 2)]:
    with pytest.raises(ValueError, match="feature_exits") as excinfo:
      _trace_update(byot(feature_exits=feature_exits), one_exit)
    _one_line_error(excinfo, "byot", "beyond", "1")
  _trace_update(byot(feature_exits=(1,)), one_exit)  # in range: fine
  # A model without the exit head.
  no_head = {k: one_exit[k] for k in ("logits", "features")}
  with pytest.raises(ValueError, match="exit_logits") as excinfo:
    _trace_update(byot(), no_head)
  _one_line_error(excinfo, "byot", "with_heads")
  # Exits built for another number of classes, or adapters of another width.
  with pytest.raises(ValueError, match="do not match") as excinfo:
    _trace_update(byot(), _synthetic_outputs(1, classes=4 * C))
  _one_line_error(excinfo, "byot")
  with pytest.raises(ValueError, match="width") as excinfo:
    _trace_update(byot(), _synthetic_outputs(1, width=D + 1))
  _one_line_error(excinfo, "byot")


def test_two_exits_and_feature_exits_match_numpy():
  """Every exit gets the CE and distillation terms; only `feature_exits` the feature term."""
  outputs = _synthetic_outputs(2, seed=3)
  labels = jnp.arange(B) % C
  z = np.asarray(outputs["logits"], np.float64)
  f = np.asarray(outputs["features"], np.float64)
  y, rows = np.asarray(labels), np.arange(B)
  teacher = softmax(z / T)
  want = -log_softmax(z)[rows, y]
  norms = []
  for zi, ai in zip(outputs["exit_logits"], outputs["exit_features"]):
    zi, ai = np.asarray(zi, np.float64), np.asarray(ai, np.float64)
    want = want + (1 - ALPHA) * -log_softmax(zi)[rows, y]
    want = want + ALPHA * -(teacher * log_softmax(zi / T)).sum(-1)
    norms.append(np.sqrt(((ai - f) ** 2).sum(-1)))

  @jax.jit
  def run(outputs):
    return {name: byot(feature_norm="example", feature_exits=exits).update(
        EmptyState(), outputs, {"label": labels}, step=0)
            for name, exits in (("all", None), ("second", (2,)))}

  results = run(outputs)
  np.testing.assert_allclose(results["all"][0], want + LAMBDA * (norms[0] + norms[1]),
                             rtol=2e-5)
  np.testing.assert_allclose(results["second"][0], want + LAMBDA * norms[1], rtol=2e-5)
  np.testing.assert_allclose(results["second"][2]["byot_feature_loss"], norms[1].mean(),
                             rtol=2e-5)
  assert {"byot_exit1_accuracy", "byot_exit2_accuracy"} <= set(results["all"][2])


# ----------------------------------------------------------------------------- method


def _lenet_with_exits(bn_axis_name=None):
  backbone = LeNet5BN(num_classes=C, bn_axis_name=bn_axis_name)
  exits = make_exits("byot", stage_feature_shapes(backbone, IMAGE), D, C)  # official layout
  return backbone, exits, heads.with_heads(backbone,
                                           heads.ExitHead(exits, bn_axis_name=bn_axis_name))


def _train_step(model, method, axis_name=None):
  """The caller's step: one value_and_grad of the mean loss over the wrapped parameters."""

  def step(params, batch_stats, images, labels):
    def mean_loss(params):
      outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                     train=True, mutable=["batch_stats"])
      loss, state, metrics = method.update(EmptyState(), outputs, {"label": labels}, step=0,
                                           axis_name=axis_name)
      assert state == EmptyState()
      # All devices hold equal slices: the mean of local means is the global mean.
      return jnp.mean(loss), (loss, updates["batch_stats"], metrics)

    (_, (loss, new_stats, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    if axis_name is not None:
      grads, metrics = lax.pmean((grads, metrics), axis_name)
    return loss, grads, new_stats, metrics

  return step


@pytest.fixture(scope="module")
def setup():
  backbone, exits, model = _lenet_with_exits()
  images = jax.random.normal(jax.random.PRNGKey(0), (B, *IMAGE))
  labels = jnp.arange(B) % C
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.PRNGKey(1),
                                                                       images)
  methods = {name: byot(**kwargs) for name, kwargs in VARIANTS.items()}

  @jax.jit
  def forward(variables, images):
    outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    results = {name: m.update(EmptyState(), outputs, {"label": labels}, step=0)
               for name, m in methods.items()}
    return outputs, updates["batch_stats"], results

  outputs, new_stats, results = forward(variables, images)
  step = jax.jit(_train_step(model, methods["batch"]))
  trained = step(variables["params"], variables["batch_stats"], images, labels)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return dict(backbone=backbone, exits=exits, model=model, images=images, labels=labels,
              variables=variables, methods=methods, outputs=outputs, new_stats=new_stats,
              results=results, step=step, trained=trained, evaluate=evaluate)


def _numpy_outputs(setup):
  out = setup["outputs"]
  return (np.asarray(out["logits"], np.float64), np.asarray(out["features"], np.float64),
          np.asarray(out["exit_logits"][0], np.float64),
          np.asarray(out["exit_features"][0], np.float64), np.asarray(setup["labels"]))


def _hand_output_gradients(setup):
  """d mean_b(loss_b) / d(outputs), by hand, for every variant."""
  z, f, zi, ai, y = _numpy_outputs(setup)
  onehot = np.eye(C)[y]
  teacher = softmax(z / T)
  exit_ce = (1 - ALPHA) * (softmax(zi) - onehot)
  # d soft_ce(z_i / T, p) / d z_i = (softmax(z_i / T) - p) / T; conference scales it by T².
  distill = ALPHA * (softmax(zi / T) - teacher) / T
  diff = ai - f
  example_norm = np.sqrt((diff ** 2).sum(-1, keepdims=True))
  grads = {
      "journal": ((exit_ce + distill) / B, LAMBDA * diff / example_norm / B),
      "conference": ((exit_ce + T * T * distill) / B, LAMBDA * 2.0 * diff / B),
      # torch.dist over the batch: d ||D||_F / d a_b = (a_b - f_b) / ||D||_F, not divided by B.
      "batch": ((exit_ce + distill) / B, LAMBDA * diff / np.sqrt((diff ** 2).sum())),
  }
  return (softmax(z) - onehot) / B, grads


def test_loss_matches_numpy_for_both_variants(setup):
  z, f, zi, ai, y = _numpy_outputs(setup)
  rows = np.arange(B)
  ce_deep = -log_softmax(z)[rows, y]
  ce_exit = -log_softmax(zi)[rows, y]
  teacher = softmax(z / T)
  soft_ce = -(teacher * log_softmax(zi / T)).sum(-1)
  sq = ((ai - f) ** 2).sum(-1)
  expected = {
      "journal": ce_deep + 0.7 * ce_exit + 0.3 * soft_ce + 0.03 * np.sqrt(sq),
      "conference": ce_deep + 0.7 * ce_exit + 0.3 * 9.0 * soft_ce + 0.03 * sq,
      # torch.dist over the batch: every example carries the Frobenius norm.
      "batch": ce_deep + 0.7 * ce_exit + 0.3 * soft_ce + 0.03 * np.sqrt(sq.sum()),
  }
  for name, want in expected.items():
    loss, state, metrics = setup["results"][name]
    assert loss.shape == (B,) and state == EmptyState()
    np.testing.assert_allclose(loss, want, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(metrics["byot_exit_ce"], ce_exit.mean(), rtol=2e-5)
    np.testing.assert_allclose(metrics["byot_exit1_accuracy"],
                               np.mean(zi.argmax(-1) == y), atol=1e-7)
  assert not np.allclose(expected["journal"], expected["batch"])
  np.testing.assert_allclose(setup["results"]["journal"][2]["byot_feature_loss"],
                             np.sqrt(sq).mean(), rtol=2e-5)
  np.testing.assert_allclose(setup["results"]["conference"][2]["byot_distill"],
                             9.0 * soft_ce.mean(), rtol=2e-5)
  # The head's outputs: 'byot' exits' class logits are their logits.
  out = setup["outputs"]
  assert set(out["exit_class_logits"]) == {"exit1"}
  np.testing.assert_array_equal(out["exit_class_logits"]["exit1"], out["exit_logits"][0])
  assert out["exit_logits"][0].shape == (B, C) and out["exit_features"][0].shape == (B, D)


def test_gradients_of_the_loss_wrt_the_outputs_match_the_hand_computation(setup):
  """The teacher (deepest logits and features) gets nothing from the exits' terms; the exits'
  logits and adapted features get exactly the derivative of their terms."""
  keys = ("logits", "features", "exit_logits", "exit_features")
  outputs = {k: setup["outputs"][k] for k in keys}
  labels = setup["labels"]

  @jax.jit
  def grads(outputs):
    return {name: jax.grad(lambda o, m=m: jnp.mean(
        m.update(EmptyState(), o, {"label": labels}, step=0)[0]))(outputs)
            for name, m in setup["methods"].items()}

  g_logits, hand = _hand_output_gradients(setup)
  for name, g in grads(outputs).items():
    # Deepest logits: only CE(z) reaches them, (softmax - onehot) / B; nothing from the teacher.
    roundoff.assert_close_to_scale(g["logits"], g_logits, roundoff.STEP_RTOL, err_msg=name)
    np.testing.assert_array_equal(g["features"], 0.0)  # deepest features: sg
    roundoff.assert_close_to_scale(g["exit_logits"][0], hand[name][0], roundoff.STEP_RTOL,
                                   err_msg=name)
    roundoff.assert_close_to_scale(g["exit_features"][0], hand[name][1], roundoff.STEP_RTOL,
                                   err_msg=name)


def _independent_grads(backbone, exits, params, batch_stats, images, labels):
  """The BYOT journal loss with torch.dist, written out on backbone and exits applied apart."""

  def mean_loss(backbone_params, exit_params):
    out, _ = backbone.apply({"params": backbone_params, "batch_stats": batch_stats["backbone"]},
                            images, train=True, mutable=["batch_stats"])
    (zs, adapted), _ = exits.apply(
        {"params": exit_params, "batch_stats": batch_stats["heads_0"]["exits"]},
        out["stage_features"], train=True, mutable=["batch_stats"])
    z, f = out["logits"], lax.stop_gradient(out["features"])
    onehot = jax.nn.one_hot(labels, C)
    teacher = jax.nn.softmax(lax.stop_gradient(z) / T)
    ce = -jnp.sum(onehot * jax.nn.log_softmax(z), -1)
    exit_ce = -jnp.sum(onehot * jax.nn.log_softmax(zs[0]), -1)
    soft_ce = -jnp.sum(teacher * jax.nn.log_softmax(zs[0] / T), -1)
    frobenius = jnp.sqrt(jnp.sum(jnp.square(adapted[0] - f)))
    return jnp.mean(ce + (1 - ALPHA) * exit_ce + ALPHA * soft_ce) + LAMBDA * frobenius

  g_backbone, g_exits = jax.grad(mean_loss, argnums=(0, 1))(params["backbone"],
                                                           params["heads_0"]["exits"])
  return {"backbone": g_backbone, "heads_0": {"exits": g_exits}}


def test_one_value_and_grad_trains_the_exits_and_reaches_the_backbone_through_stage_features(
    setup):
  """The caller's single value_and_grad over the wrapped parameters: the exits get the gradient
  of their terms, the backbone the CE's plus the exits' terms through its stage features; one
  optimizer step on the whole tree lowers the loss."""
  backbone, exits, model = setup["backbone"], setup["exits"], setup["model"]
  variables, images, labels = setup["variables"], setup["images"], setup["labels"]
  params, batch_stats = variables["params"], variables["batch_stats"]
  loss, grads, new_stats, _ = setup["trained"]
  assert set(grads) == {"backbone", "heads_0"}
  np.testing.assert_array_equal(loss, setup["results"]["batch"][0])  # the same forward pass
  # By hand: the exit classifier's bias gets sum_b dL/dz_i, the adapter's sum_b dL/da_i.
  _, hand = _hand_output_gradients(setup)
  g_exits = grads["heads_0"]["exits"]
  roundoff.assert_close_to_scale(g_exits["exit1"]["classifier"]["bias"],
                                 hand["batch"][0].sum(0), roundoff.STEP_RTOL)
  roundoff.assert_close_to_scale(g_exits["adapter1"]["bias"], hand["batch"][1].sum(0),
                                 roundoff.STEP_RTOL)
  # The whole tree against an independent formulation (backbone and exits applied apart).
  independent = jax.jit(functools.partial(_independent_grads, backbone, exits))(
      params, batch_stats, images, labels)
  roundoff.assert_trees_close_to_scale(grads, independent, roundoff.STEP_RTOL)
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(g_exits["exit1"]["classifier"]))

  # The backbone: only the CE(z) path reaches the layers after stage 1 (the exits' teacher
  # is sg); stage 1 (conv1, bn1) also gets the exits' terms through its stage features.
  @jax.jit
  def ce_only_grads(params):
    def mean_ce(params):
      outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                               train=True, mutable=["batch_stats"])
      logp = jax.nn.log_softmax(outputs["logits"])
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    return jax.grad(mean_ce)(params)

  ce_only = ce_only_grads(params)
  assert not any(np.any(g) for g in jax.tree.leaves(ce_only["heads_0"]))
  later = ("bn2", "conv2", "fc1", "fc2", "classifier")
  roundoff.assert_trees_close_to_scale({k: grads["backbone"][k] for k in later},
                                       {k: ce_only["backbone"][k] for k in later},
                                       roundoff.STEP_RTOL)
  for layer in ("conv1", "bn1"):
    for g, g_ce in zip(jax.tree.leaves(grads["backbone"][layer]),
                       jax.tree.leaves(ce_only["backbone"][layer])):
      assert np.abs(g - g_ce).max() > 0.01 * np.abs(g).max(), layer
  # The caller's one optimizer steps backbone and exits together and lowers the loss.
  tx = optax.sgd(0.01)
  updates, _ = tx.update(grads, tx.init(params), params)
  stepped = optax.apply_updates(params, updates)
  loss_after, *_ = setup["step"](stepped, batch_stats, images, labels)
  assert float(jnp.mean(loss_after)) < float(jnp.mean(loss))
  # BatchNorm statistics of both parts moved in train mode.
  for part in ("backbone", "heads_0"):
    for old, new in zip(jax.tree.leaves(batch_stats[part]), jax.tree.leaves(new_stats[part])):
      assert not np.allclose(old, new), part


def test_exit_batch_stats_move_in_train_mode_and_serve_eval_mode(setup):
  variables, new_stats = setup["variables"], setup["new_stats"]
  old_leaves = jax.tree.leaves(variables["batch_stats"]["heads_0"])
  new_leaves = jax.tree.leaves(new_stats["heads_0"])
  assert old_leaves and all(not np.allclose(a, b) for a, b in zip(old_leaves, new_leaves))
  evaluate, images = setup["evaluate"], setup["images"]
  with_new = evaluate({"params": variables["params"], "batch_stats": new_stats}, images)
  with_old = evaluate({"params": variables["params"],
                       "batch_stats": {"backbone": new_stats["backbone"],
                                       "heads_0": variables["batch_stats"]["heads_0"]}}, images)
  got = with_new["exit_class_logits"]
  assert set(got) == {"exit1"} and got["exit1"].shape == (B, C)
  assert not np.allclose(got["exit1"], with_old["exit_class_logits"]["exit1"])
  np.testing.assert_array_equal(with_new["logits"], with_old["logits"])  # the exits' stats only
  manual, _ = setup["exits"].apply(
      {"params": variables["params"]["heads_0"]["exits"],
       "batch_stats": new_stats["heads_0"]["exits"]},
      with_new["stage_features"], train=False)
  np.testing.assert_allclose(got["exit1"], manual[0], rtol=1e-5, atol=1e-6)
  # Eval mode reads the statistics and does not depend on the batch: one example alone.
  alone = evaluate({"params": variables["params"], "batch_stats": new_stats}, images[:1])
  np.testing.assert_allclose(alone["exit_class_logits"]["exit1"], got["exit1"][:1], rtol=1e-5,
                             atol=1e-6)


def test_evaluation_and_export_use_the_backbone_alone(setup):
  backbone, evaluate, images = setup["backbone"], setup["evaluate"], setup["images"]
  variables = {"params": setup["variables"]["params"], "batch_stats": setup["new_stats"]}
  alone_vars = heads.backbone_variables(variables)
  image = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  own = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), image)
  assert jax.tree.structure(alone_vars) == jax.tree.structure(own)
  assert heads.parameter_count(alone_vars["params"]) == heads.parameter_count(own["params"])
  assert heads.parameter_count(alone_vars["params"]) == 61_728
  wrapped = evaluate(variables, images)
  alone = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(alone_vars, images)
  assert set(wrapped) - set(alone) == {"exit_logits", "exit_features", "exit_class_logits"}
  np.testing.assert_array_equal(alone["logits"], wrapped["logits"])
  np.testing.assert_array_equal(alone["features"], wrapped["features"])
  with pytest.raises(ValueError, match="with_heads") as excinfo:
    heads.backbone_variables(own)
  _one_line_error(excinfo, "backbone_variables")


@pytest.mark.cross_device
def test_four_devices_match_one_device(setup):
  """shard_map over 4 devices (cross-device BatchNorm in backbone and exits, pmean'd gradients,
  the batch feature norm's psum) gives the single-device step on the same global batch."""
  _, _, model = _lenet_with_exits(bn_axis_name="data")
  step = _train_step(model, setup["methods"]["batch"], axis_name="data")
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  sharded = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P("data"), P(), P(), P()), check_vma=False))
  variables = setup["variables"]
  loss_4, grads_4, stats_4, metrics_4 = sharded(variables["params"], variables["batch_stats"],
                                                setup["images"], setup["labels"])
  loss_1, grads_1, stats_1, metrics_1 = setup["trained"]
  roundoff.assert_close_to_scale(loss_4, loss_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(grads_4, grads_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(stats_4, stats_1, roundoff.STEP_RTOL)
  assert set(metrics_4) == set(metrics_1)
  roundoff.assert_trees_close_to_scale(metrics_4, metrics_1, roundoff.STEP_RTOL)


@pytest.mark.parametrize("method", ["byot", "lsskd"])
def test_exits_start_like_their_backbone(method):
  """`config.model.init` reaches the exits the trainer builds (the official codes initialise
  the whole network with one scheme); the schemes' values are tested in test_model_init.py."""
  from selfkd_jax import models  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train import method_factory  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train.default_config import method_config  # pylint: disable=g-import-not-at-top
  for scheme in ("pytorch", "kaiming_fan_out", "flax"):
    backbone = models.get_model("lenet5_bn", num_classes=C, init=scheme)
    context = method_factory.MethodContext(
        num_classes=C, num_examples=64, num_epochs=1,
        **method_factory.model_fields(backbone, IMAGE))
    (head,) = method_factory.build_heads(method_config(method), context)
    assert head.exits.init_scheme == scheme
