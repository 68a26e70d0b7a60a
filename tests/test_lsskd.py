"""LSSKD (methods/lsskd.py): rotations, joint labels, per-head PS-KD tables, the loss, its heads
attached to the model (heads.ExitHead of 'hsakd' exits), sharding.

Method-level tests feed `update` synthetic per-(example, rotation) outputs: 6-d features,
3 classes (12 joint classes), two heads, 8 examples of an 18-example dataset. Model-level tests
run LeNet-5-BN (3 classes) with HSAKD 'conv' heads on both stages, attached by
`heads.with_heads`, on `rotate_batch` of 8 random 28×28 images (32 rows); the caller's step is
one `jax.value_and_grad` of the mean loss over the wrapped model's parameters.
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
from selfkd_jax import heads, methods
from selfkd_jax.methods.lsskd import (LSSKDState, joint_labels, joint_row_ids, lsskd,
                                      lsskd_aux_terms, rotate_batch)
from selfkd_jax.models import LeNet5BN
from selfkd_jax.models.exits import backbone_exit_kwargs, make_exits, stage_feature_shapes
from numpy_reference import log_softmax, softmax

B, C, D, N, E = 8, 3, 6, 18, 4
R = 4
H = 2  # heads
T, FEATURE_WEIGHT = 3.0, 0.03  # lsskd's defaults (aux_weight = distill_weight = 1)
IMAGE = (28, 28, 1)
LENET_D = 84
INDEX = np.array([3, 17, 0, 9, 12, 5, 8, 14])
LABELS = np.array([0, 1, 2, 1, 0, 2, 2, 1])


def _rotation_major(x):
  """[B, R, ...] (example, rotation) -> [R·B, ...] rows k·B + b (one device's layout)."""
  x = np.asarray(x)
  return np.swapaxes(x, 0, 1).reshape((R * x.shape[0],) + x.shape[2:])


def _per_device(x, devices):
  """[B, R, ...] -> each device's rotation-major block of its B/devices examples, stacked."""
  x = np.asarray(x)
  b = x.shape[0] // devices
  blocks = [_rotation_major(x[d * b:(d + 1) * b]) for d in range(devices)]
  return np.concatenate(blocks, axis=0)


def _kl(teacher_logits, student_logits, t):
  lp, lq = log_softmax(teacher_logits / t), log_softmax(student_logits / t)
  return t * t * (np.exp(lp) * (lp - lq)).sum(-1)


def _targets(labels, past, alpha):
  return (1 - alpha) * np.eye(past.shape[-1])[labels] + alpha * past


def _one_line_error(excinfo, *words):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for word in words:
    assert word in message, message


# ----------------------------------------------------------------------------- pure pieces


def test_rotate_batch_is_rotation_major_rot90s():
  assert methods.rotate_batch is rotate_batch
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  out = np.asarray(jax.jit(rotate_batch)(x))
  assert out.shape == (8, 5, 5, 3)
  np.testing.assert_array_equal(out[:2], x)
  for k in range(1, 4):
    np.testing.assert_array_equal(out[2 * k:2 * k + 2], np.rot90(x, k, axes=(1, 2)))
  assert not np.array_equal(out[2:4], x)
  with pytest.raises(ValueError, match="square") as excinfo:
    rotate_batch(jnp.zeros((2, 4, 5, 3)))
  _one_line_error(excinfo, "lsskd")


def test_joint_labels_and_row_ids():
  y, idx = jnp.array([2, 0, 1]), jnp.array([5, 0, 7])
  # row k·B + b: joint label 4·y_b + k, table row 4·index_b + k
  np.testing.assert_array_equal(joint_labels(y), [8, 0, 4, 9, 1, 5, 10, 2, 6, 11, 3, 7])
  np.testing.assert_array_equal(joint_row_ids(idx, 8),
                                [20, 0, 28, 21, 1, 29, 22, 2, 30, 23, 3, 31])
  ids = np.asarray(joint_row_ids(jnp.array([1, 2**31 - 1]), 8))
  assert ids[0] == 4 and ids[1] == 2**31 - 1  # padding examples map past every table


def test_aux_terms_match_numpy_and_stop_the_teacher_gradient():
  rng = np.random.default_rng(1)
  m, j, num_heads = 5, 12, 3
  z = [rng.normal(size=(m, j)).astype(np.float32) * 2 for _ in range(num_heads)]
  a = [rng.normal(size=(m, D)).astype(np.float32) for _ in range(num_heads)]
  f = rng.normal(size=(m, D)).astype(np.float32)
  q = [softmax(rng.normal(size=(m, j))).astype(np.float32) for _ in range(num_heads)]
  kw = dict(temperature=3.0, distill_weight=0.7, feature_weight=0.03, aux_weight=1.3)

  @jax.jit
  def run(z, f):
    per_row, terms = lsskd_aux_terms(z, a, f, q, **kw)
    g_z = jax.grad(lambda z: jnp.sum(lsskd_aux_terms(z, a, f, q, **kw)[1]["distill"]))(z)
    g_f = jax.grad(lambda f: jnp.sum(lsskd_aux_terms(z, a, f, q, **kw)[0]))(f)
    return per_row, terms, g_z, g_f

  per_row, terms, g, g_f = run(z, f)
  ce = [-(q[h] * log_softmax(z[h])).sum(-1) for h in range(num_heads)]
  kl = [_kl(z[-1], z[h], 3.0) for h in range(num_heads - 1)] + [np.zeros(m)]
  l2 = [np.sqrt(((a[h].astype(np.float64) - f) ** 2).sum(-1)) for h in range(num_heads)]
  want = sum(1.3 * ce[h] + 0.7 * kl[h] + 0.03 * l2[h] for h in range(num_heads))
  np.testing.assert_allclose(per_row, want, rtol=2e-5)
  np.testing.assert_allclose(terms["distill"], np.stack(kl), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(terms["feature"], np.stack(l2), rtol=2e-5)
  # Deep-to-shallow KL: the deepest head is the teacher only; the shallower ones learn.
  np.testing.assert_array_equal(g[-1], 0.0)
  assert all(float(np.abs(gh).max()) > 0 for gh in g[:-1])
  np.testing.assert_array_equal(g_f, 0.0)  # final features: sg


def test_constructor_validation():
  for kwargs, word in [({"alpha_T": 1.5}, "alpha_T"), ({"aux_alpha_T": -0.1}, "aux_alpha_T"),
                       ({"temperature": 0.0}, "temperature"),
                       ({"distill_weight": -1.0}, "distill_weight"),
                       ({"feature_weight": -1.0}, "feature_weight"),
                       ({"aux_weight": -1.0}, "aux_weight"),
                       ({"storage_dtype": jnp.float16}, "storage_dtype")]:
    with pytest.raises(ValueError, match=word) as excinfo:
      lsskd(N, C, E, num_heads=H, steps_per_epoch=1, **kwargs)
    _one_line_error(excinfo, "lsskd")
  for args, num_heads in [((0, C, E), H), ((N, C, E), 0)]:
    with pytest.raises(ValueError, match="positive") as excinfo:
      lsskd(*args, num_heads=num_heads, steps_per_epoch=1)
    _one_line_error(excinfo, "lsskd")


# ----------------------------------------------------------------------------- method


def _synthetic(seed=0, num_heads=H, joint=R * C, width=D):
  """Per (example, rotation) synthetic outputs of a model with heads, `[B, R, ...]`."""
  rng = np.random.default_rng(seed)
  return {
      "logits": (2.0 * rng.normal(size=(B, R, C))).astype(np.float32),
      "features": np.maximum(rng.normal(size=(B, R, D)), 0).astype(np.float32),
      "exit_logits": tuple((2.0 * rng.normal(size=(B, R, joint))).astype(np.float32)
                           for _ in range(num_heads)),
      "exit_features": tuple(rng.normal(size=(B, R, width)).astype(np.float32)
                             for _ in range(num_heads)),
  }


@pytest.fixture(scope="module")
def setup():
  ex = _synthetic()
  outputs = jax.tree.map(lambda x: jnp.asarray(_rotation_major(x)), ex)
  batch = {"label": jnp.asarray(LABELS), "index": jnp.asarray(INDEX)}
  method = lsskd(N, C, E, num_heads=H, steps_per_epoch=1)
  # Tables padded for 4 devices as the trainer does (main table: 18 -> 20 rows).
  state0 = methods.pad_tables(jax.jit(method.init)(jax.random.PRNGKey(1)), 4)
  update = jax.jit(method.update, static_argnames=("axis_name",))
  loss1, state1, metrics1 = update(state0, outputs, batch, step=0)
  loss2, state2, metrics2 = update(state1, outputs, batch, step=1)
  return dict(ex=ex, outputs=outputs, batch=batch, method=method, update=update,
              state0=state0, state1=state1, state2=state2, loss1=loss1, loss2=loss2,
              metrics1=metrics1, metrics2=metrics2)


def _aux_targets(epoch, aux_past):
  """Per head `[4B, 4C]` soft targets of the rotation-major rows (numpy)."""
  alpha = 0.8 * min(epoch + 1, E) / E
  joint = np.concatenate([4 * LABELS + k for k in range(R)])
  rows = np.concatenate([4 * INDEX + k for k in range(R)])
  return [_targets(joint, np.eye(4 * C)[joint] if epoch == 0 else past[rows], alpha)
          for past in aux_past]


def _main_targets(epoch, main_past, main_pskd=True):
  alpha = 0.8 * min(epoch + 1, E) / E if main_pskd else 0.0  # main_pskd=False: plain CE
  past = np.eye(C)[LABELS] if epoch == 0 or not main_pskd else main_past[INDEX]
  return _targets(LABELS, past, alpha)


def _numpy_loss(out, epoch, main_past, aux_past, main_pskd=True):
  """The full LSSKD loss in numpy from the outputs and the given tables."""
  z_heads = [np.asarray(z, np.float64) for z in out["exit_logits"]]
  a_heads = [np.asarray(a, np.float64) for a in out["exit_features"]]
  f = np.asarray(out["features"], np.float64)
  main = np.asarray(out["logits"], np.float64)[:B]
  main_loss = -(_main_targets(epoch, main_past, main_pskd) * log_softmax(main)).sum(-1)
  per_row = np.zeros(R * B)
  targets = _aux_targets(epoch, aux_past if epoch else [None] * len(z_heads))
  for h, (z, a, q) in enumerate(zip(z_heads, a_heads, targets)):
    per_row += -(q * log_softmax(z)).sum(-1)
    per_row += FEATURE_WEIGHT * np.sqrt(((a - f) ** 2).sum(-1))
    if h < len(z_heads) - 1:
      per_row += 1.0 * _kl(z_heads[-1], z, T)
  return main_loss + per_row.reshape(R, B).mean(0), z_heads


def _hand_output_gradients(out, epoch, main_past, aux_past):
  """d mean_b(L_b) / d(outputs) by hand: each auxiliary row weighs 1/(4B), each main row 1/B."""
  logits = np.asarray(out["logits"], np.float64)
  g_logits = np.zeros_like(logits)
  g_logits[:B] = (softmax(logits[:B]) - _main_targets(epoch, main_past)) / B
  z_heads = [np.asarray(z, np.float64) for z in out["exit_logits"]]
  f = np.asarray(out["features"], np.float64)
  targets = _aux_targets(epoch, aux_past if epoch else [None] * len(z_heads))
  teacher = softmax(z_heads[-1] / T)
  g_z, g_a = [], []
  for h, (z, a, q) in enumerate(zip(z_heads, out["exit_features"], targets)):
    g = softmax(z) - q
    if h < len(z_heads) - 1:  # d T²·KL(p || softmax(z/T)) / dz = T·(softmax(z/T) - p)
      g = g + T * (softmax(z / T) - teacher)
    g_z.append(g / (R * B))
    diff = np.asarray(a, np.float64) - f
    g_a.append(FEATURE_WEIGHT * diff / np.sqrt((diff ** 2).sum(-1, keepdims=True)) / (R * B))
  return g_logits, g_z, g_a


def test_tables_written_at_rows_4i_plus_k_and_read_back_as_targets(setup):
  state0, state1, out = setup["state0"], setup["state1"], setup["outputs"]
  assert isinstance(state1, LSSKDState) and len(state1.aux_predictions) == H
  assert state1._fields == ("main_predictions", "aux_predictions")  # tables only
  assert state1.main_predictions.rows.shape == (N + 2, C)  # padded
  assert all(t.rows.shape == (R * N, R * C) for t in state1.aux_predictions)
  assert not np.any(state0.main_predictions.rows)
  # Step 1 (epoch 0): one-hot targets; the tables receive this step's predictions.
  want1, z_heads = _numpy_loss(out, 0, None, None)
  assert setup["loss1"].shape == (B,)
  np.testing.assert_allclose(setup["loss1"], want1, rtol=2e-5)
  main_rows = np.asarray(state1.main_predictions.rows)
  np.testing.assert_allclose(main_rows[INDEX], softmax(np.asarray(out["logits"])[:B]),
                             rtol=1e-5)
  untouched = np.setdiff1d(np.arange(N + 2), INDEX)
  np.testing.assert_array_equal(main_rows[untouched], 0.0)
  for h, table in enumerate(state1.aux_predictions):
    rows = np.asarray(table.rows)
    for k in range(R):
      # Row k·B + b of the outputs is example b rotated by k·90°: table row 4·index_b + k.
      np.testing.assert_allclose(rows[4 * INDEX + k], softmax(setup["ex"]["exit_logits"][h][:, k]),
                                 rtol=1e-5, atol=1e-7)
    written = np.concatenate([4 * INDEX + k for k in range(R)])
    np.testing.assert_array_equal(np.delete(rows, written, axis=0), 0.0)
  # Step 2 (epoch 1): the written rows are the targets' past predictions.
  aux_past = [np.asarray(t.rows, np.float64) for t in state1.aux_predictions]
  want2, _ = _numpy_loss(out, 1, main_rows.astype(np.float64), aux_past)
  np.testing.assert_allclose(setup["loss2"], want2, rtol=2e-5)
  # ... and would differ with one-hot targets (the read-back matters).
  onehot2, _ = _numpy_loss(out, 0, None, None)
  assert not np.allclose(want2, onehot2, rtol=1e-3)
  np.testing.assert_allclose(setup["metrics2"]["lsskd_alpha"], 0.8 * 2 / E, rtol=1e-6)


def test_gradients_wrt_the_outputs_match_the_hand_computation(setup):
  """At epoch 1 (targets read from the tables): the main classifier learns from the un-rotated
  rows only, the backbone's features are the heads' sg target, every head learns from every
  rotation, and the deepest head gets no KL gradient."""
  method, state1, batch, out = setup["method"], setup["state1"], setup["batch"], setup["outputs"]

  @jax.jit
  def grads(outputs):
    return jax.grad(lambda o: jnp.mean(method.update(state1, o, batch, step=1)[0]))(outputs)

  g = grads(out)
  main_past = np.asarray(state1.main_predictions.rows, np.float64)
  aux_past = [np.asarray(t.rows, np.float64) for t in state1.aux_predictions]
  g_logits, g_z, g_a = _hand_output_gradients(out, 1, main_past, aux_past)
  roundoff.assert_close_to_scale(g["logits"], g_logits, roundoff.STEP_RTOL)
  np.testing.assert_array_equal(g["logits"][B:], 0.0)
  np.testing.assert_array_equal(g["features"], 0.0)
  for h in range(H):
    roundoff.assert_close_to_scale(g["exit_logits"][h], g_z[h], roundoff.STEP_RTOL,
                                   err_msg=f"head {h}")
    roundoff.assert_close_to_scale(g["exit_features"][h], g_a[h], roundoff.STEP_RTOL,
                                   err_msg=f"head {h}")
    per_rotation = np.abs(np.asarray(g["exit_logits"][h])).reshape(R, B, -1).max(axis=(1, 2))
    assert (per_rotation > 0).all()


def test_metrics(setup):
  m = setup["metrics1"]
  assert {"lsskd_exit1_accuracy", "lsskd_exit2_accuracy", "lsskd_exit1_class_accuracy",
          "lsskd_aux_ce", "lsskd_distill", "lsskd_feature_loss", "lsskd_main_loss"} <= set(m)
  z_heads = [np.asarray(z) for z in setup["outputs"]["exit_logits"]]
  joint = np.concatenate([4 * LABELS + k for k in range(R)])
  np.testing.assert_allclose(m["lsskd_exit1_accuracy"],
                             np.mean(np.argmax(z_heads[0], -1) == joint), atol=1e-7)
  np.testing.assert_allclose(m["lsskd_exit2_class_accuracy"],
                             np.mean(np.argmax(z_heads[1][:B, 0::R], -1) == LABELS), atol=1e-7)
  np.testing.assert_allclose(m["lsskd_distill"], _kl(z_heads[1], z_heads[0], T).mean(),
                             rtol=2e-5)


def _trace_update(method, outputs, state=None):
  batch = {"label": jnp.asarray(LABELS), "index": jnp.asarray(INDEX)}
  state = method.init() if state is None else state
  return jax.eval_shape(lambda o: method.update(state, o, batch, step=0), outputs)


def test_update_errors_are_one_line():
  method = lsskd(N, C, E, num_heads=H, steps_per_epoch=1)
  rotated = jax.tree.map(lambda x: jnp.asarray(_rotation_major(x)), _synthetic())
  _trace_update(method, rotated)  # fine
  # A model with another number of heads than the tables.
  with pytest.raises(ValueError, match="heads") as excinfo:
    _trace_update(lsskd(N, C, E, num_heads=3, steps_per_epoch=1), rotated)
  _one_line_error(excinfo, "lsskd", "num_heads=3", "2")
  # The model run on the plain batch instead of rotate_batch(images).
  plain = jax.tree.map(lambda x: jnp.asarray(x[:, 0]), _synthetic())
  with pytest.raises(ValueError, match="rotate_batch") as excinfo:
    _trace_update(method, plain)
  _one_line_error(excinfo, "lsskd", str(B))
  # 'byot' exits (C outputs, not 4C joint classes), adapters of another width, no heads at all.
  byot_like = jax.tree.map(lambda x: jnp.asarray(_rotation_major(x)), _synthetic(joint=C))
  with pytest.raises(ValueError, match="joint") as excinfo:
    _trace_update(method, byot_like)
  _one_line_error(excinfo, "lsskd", "hsakd")
  wide = jax.tree.map(lambda x: jnp.asarray(_rotation_major(x)), _synthetic(width=D + 1))
  with pytest.raises(ValueError, match="width") as excinfo:
    _trace_update(method, wide)
  _one_line_error(excinfo, "lsskd")
  with pytest.raises(ValueError, match="exit_logits") as excinfo:
    _trace_update(method, {k: rotated[k] for k in ("logits", "features")})
  _one_line_error(excinfo, "lsskd", "with_heads")


def test_table_bytes():
  fp32 = jax.eval_shape(lsskd(N, C, E, num_heads=H, steps_per_epoch=1).init)
  bf16 = jax.eval_shape(lsskd(N, C, E, num_heads=H, steps_per_epoch=1,
                              storage_dtype=jnp.bfloat16, main_pskd=False).init)
  assert bf16.main_predictions is None
  assert all(t.value_dtype == jnp.bfloat16 for t in bf16.aux_predictions)
  assert methods.table_bytes(fp32) == (N * C + H * R * N * R * C) * 4
  assert methods.table_bytes(bf16, 4) == H * R * N * R * C * 2 // 4


@pytest.mark.cross_device
@pytest.mark.parametrize("variant", ["pskd_fp32", "ce_bf16"])
def test_four_devices_match_one_device(setup, variant):
  """shard_map over 4 devices (row-sharded tables, each device's rotation-major block) gives
  the 1-device result for the same global batch, at epoch 1 (tables read).

  'ce_bf16': plain CE on the main head, bf16 tables; its 1-device result is also checked
  against numpy with the bf16 past predictions."""
  ex, batch = setup["ex"], setup["batch"]
  if variant == "pskd_fp32":
    method, state = setup["method"], setup["state1"]
    loss_1, state_1 = setup["loss2"], setup["state2"]  # the same step on one device
  else:
    method = lsskd(N, C, E, num_heads=H, steps_per_epoch=1, main_pskd=False,
                   storage_dtype=jnp.bfloat16)
    state = setup["state1"]._replace(
        main_predictions=None,
        aux_predictions=tuple(methods.PerExampleTable.from_values(t.rows, jnp.bfloat16)
                              for t in setup["state1"].aux_predictions))

  def step(state, outputs, batch, axis_name):
    return method.update(state, outputs, batch, step=1, axis_name=axis_name)

  if variant == "ce_bf16":
    loss_1, state_1, _ = jax.jit(functools.partial(step, axis_name=None))(
        state, setup["outputs"], batch)
    assert all(t.value_dtype == jnp.bfloat16 for t in state_1.aux_predictions)
    aux_past = [np.asarray(t.values().astype(jnp.float32), np.float64)
                for t in state.aux_predictions]
    want, z_heads = _numpy_loss(setup["outputs"], 1, None, aux_past, main_pskd=False)
    np.testing.assert_allclose(loss_1, want, rtol=2e-5)
    written = np.asarray(state_1.aux_predictions[1].values()[4 * INDEX + 2].astype(jnp.float32))
    want_rows = jnp.asarray(softmax(z_heads[1][2 * B:3 * B]), jnp.float32)
    # bf16 keeps 8 significant bits: equal up to one bf16 rounding step.
    np.testing.assert_allclose(written, np.asarray(want_rows), rtol=8e-3, atol=1e-6)

  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  specs = methods.partition_specs(state, "data")
  sharded = jax.jit(jax.shard_map(
      functools.partial(step, axis_name="data"), mesh=mesh,
      in_specs=(specs, P("data"), P("data")), out_specs=(P("data"), specs, P()),
      check_vma=False))
  outputs_4 = jax.tree.map(lambda x: jnp.asarray(_per_device(x, 4)), ex)
  loss_4, state_4, metrics_4 = sharded(state, outputs_4, batch)
  roundoff.assert_close_to_scale(loss_4, loss_1, roundoff.STEP_RTOL)
  leaves_4, leaves_1 = jax.tree.leaves(state_4), jax.tree.leaves(state_1)
  assert [a.dtype for a in leaves_4] == [b.dtype for b in leaves_1]
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.STEP_RTOL)
  assert set(metrics_4) == set(setup["metrics2"])


# ----------------------------------------------------------------------------- heads


def _lenet_with_heads(bn_axis_name=None):
  backbone = LeNet5BN(num_classes=C, bn_axis_name=bn_axis_name)
  head = heads.exit_head_for("hsakd", backbone, IMAGE, C, bn_axis_name=bn_axis_name,
                             **backbone_exit_kwargs(backbone))
  return backbone, head.exits, heads.with_heads(backbone, head)


OUTPUT_KEYS = ("logits", "features", "exit_logits", "exit_features")


def _train_step(model, method, axis_name=None):
  """The caller's LSSKD step at epoch 1: the model with its heads on rotate_batch(images), one
  value_and_grad of the mean loss over the wrapped parameters."""

  def step(params, batch_stats, method_state, images, batch):
    def mean_loss(params):
      outputs, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                     rotate_batch(images), train=True, mutable=["batch_stats"])
      loss, new_state, metrics = method.update(method_state, outputs, batch, step=1,
                                               axis_name=axis_name)
      outputs = {k: outputs[k] for k in OUTPUT_KEYS}
      # All devices hold equal slices: the mean of local means is the global mean.
      return jnp.mean(loss), (loss, updates["batch_stats"], new_state, metrics, outputs)

    (_, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    loss, new_stats, new_state, metrics, outputs = aux
    if axis_name is not None:
      grads, metrics = lax.pmean((grads, metrics), axis_name)
    return loss, grads, new_stats, new_state, metrics, outputs

  return step


@pytest.fixture(scope="module")
def model_setup(setup):
  backbone, exits, model = _lenet_with_heads()
  assert exits.kind == "hsakd" and exits.exit_stages == (0, 1) and exits.rotations == R
  images = jax.random.normal(jax.random.PRNGKey(0), (B, *IMAGE))
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.PRNGKey(1),
                                                                       images)
  method, state = setup["method"], setup["state1"]  # tables written: epoch-1 targets
  step = jax.jit(_train_step(model, method))
  trained = step(variables["params"], variables["batch_stats"], state, images, setup["batch"])
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return dict(backbone=backbone, exits=exits, model=model, images=images, variables=variables,
              method=method, state=state, step=step, trained=trained, evaluate=evaluate)


def test_one_value_and_grad_trains_the_heads_and_reaches_the_backbone_through_stage_features(
    setup, model_setup):
  """The heads get the gradient of their terms, the backbone the main term's plus the heads'
  terms through its stage features (heads on both LeNet blocks); one optimizer step on the
  whole tree lowers the loss; the tables get the heads' predictions at rows 4i + k."""
  model, variables, images = model_setup["model"], model_setup["variables"], model_setup["images"]
  params, batch_stats, state = variables["params"], variables["batch_stats"], model_setup["state"]
  loss, grads, new_stats, new_state, _, outputs = model_setup["trained"]
  assert set(grads) == {"backbone", "heads_0"}
  assert [z.shape for z in outputs["exit_logits"]] == [(R * B, R * C)] * H
  main_past = np.asarray(state.main_predictions.rows, np.float64)
  aux_past = [np.asarray(t.rows, np.float64) for t in state.aux_predictions]
  want, _ = _numpy_loss(outputs, 1, main_past, aux_past)
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  # By hand: each head's classifier bias gets sum_r dL/dz_h, its adapter's sum_r dL/da_h.
  g_logits, g_z, g_a = _hand_output_gradients(outputs, 1, main_past, aux_past)
  g_heads = grads["heads_0"]["exits"]
  for h in range(H):
    roundoff.assert_close_to_scale(g_heads[f"exit{h + 1}"]["classifier"]["bias"],
                                   g_z[h].sum(0), roundoff.STEP_RTOL)
    roundoff.assert_close_to_scale(g_heads[f"adapter{h + 1}"]["bias"], g_a[h].sum(0),
                                   roundoff.STEP_RTOL)

  # The whole tree: the hand-computed output gradient pulled back through the wrapped model.
  @jax.jit
  def pull_back(params, cotangent):
    def forward(params):
      outputs, _ = model.apply({"params": params, "batch_stats": batch_stats},
                               rotate_batch(images), train=True, mutable=["batch_stats"])
      return {k: outputs[k] for k in OUTPUT_KEYS}
    return jax.vjp(forward, params)[1](cotangent)[0]

  def cotangent(logits, z, a):
    as32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return {"logits": as32(logits), "features": jnp.zeros_like(outputs["features"]),
            "exit_logits": tuple(map(as32, z)), "exit_features": tuple(map(as32, a))}

  roundoff.assert_trees_close_to_scale(grads, pull_back(params, cotangent(g_logits, g_z, g_a)),
                                       roundoff.STEP_RTOL)
  # The main term alone: nothing for the heads; the layers after the last stage get only it,
  # the stages (conv1, bn1, conv2, bn2) also the heads' terms.
  main_only = pull_back(params, cotangent(g_logits, [0 * z for z in g_z], [0 * a for a in g_a]))
  assert not any(np.any(g) for g in jax.tree.leaves(main_only["heads_0"]))
  later = ("fc1", "fc2", "classifier")
  roundoff.assert_trees_close_to_scale({k: grads["backbone"][k] for k in later},
                                       {k: main_only["backbone"][k] for k in later},
                                       roundoff.STEP_RTOL)
  for layer in ("conv1", "bn1", "conv2", "bn2"):
    for g, g_main in zip(jax.tree.leaves(grads["backbone"][layer]),
                         jax.tree.leaves(main_only["backbone"][layer])):
      assert np.abs(g - g_main).max() > 0.01 * np.abs(g).max(), layer
  # The tables: this step's head predictions at rows 4·index + k.
  for h, table in enumerate(new_state.aux_predictions):
    rows = np.asarray(table.rows)
    for k in range(R):
      np.testing.assert_allclose(rows[4 * INDEX + k],
                                 softmax(np.asarray(outputs["exit_logits"][h])[k * B:(k + 1) * B]),
                                 rtol=1e-5, atol=1e-7)
  # The caller's one optimizer steps backbone and heads together and lowers the loss.
  tx = optax.sgd(0.01)
  updates, _ = tx.update(grads, tx.init(params), params)
  stepped = optax.apply_updates(params, updates)
  loss_after = model_setup["step"](stepped, batch_stats, state, images, setup["batch"])[0]
  assert float(jnp.mean(loss_after)) < float(jnp.mean(loss))
  for part in ("backbone", "heads_0"):
    for old, new in zip(jax.tree.leaves(batch_stats[part]), jax.tree.leaves(new_stats[part])):
      assert not np.allclose(old, new), part


def test_heads_batch_stats_move_and_class_logits_pick_rotation_zero_columns(model_setup):
  """Train mode (4·B rotated rows) moves the heads' statistics; eval mode on plain images uses
  them, and `exit_class_logits` are the joint logits' columns 4·y + 0."""
  variables, evaluate, images = (model_setup["variables"], model_setup["evaluate"],
                                 model_setup["images"])
  new_stats = model_setup["trained"][2]
  old_leaves = jax.tree.leaves(variables["batch_stats"]["heads_0"])
  new_leaves = jax.tree.leaves(new_stats["heads_0"])
  assert old_leaves and all(not np.allclose(a, b) for a, b in zip(old_leaves, new_leaves))
  with_new = evaluate({"params": variables["params"], "batch_stats": new_stats}, images)
  with_old = evaluate({"params": variables["params"],
                       "batch_stats": {"backbone": new_stats["backbone"],
                                       "heads_0": variables["batch_stats"]["heads_0"]}}, images)
  got = with_new["exit_class_logits"]
  assert list(got) == ["exit1", "exit2"]
  manual, _ = model_setup["exits"].apply(
      {"params": variables["params"]["heads_0"]["exits"],
       "batch_stats": new_stats["heads_0"]["exits"]},
      with_new["stage_features"], train=False)
  rotation_0 = [4 * y for y in range(C)]  # joint class 4·y + 0
  for h, name in enumerate(("exit1", "exit2")):
    assert got[name].shape == (B, C) and with_new["exit_logits"][h].shape == (B, R * C)
    np.testing.assert_array_equal(got[name], np.asarray(with_new["exit_logits"][h])[:, rotation_0])
    np.testing.assert_allclose(got[name], np.asarray(manual[h])[:, rotation_0], rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(got[name], with_old["exit_class_logits"][name])


def test_evaluation_and_export_use_the_backbone_alone(model_setup):
  backbone, evaluate, images = (model_setup["backbone"], model_setup["evaluate"],
                                model_setup["images"])
  variables = {"params": model_setup["variables"]["params"],
               "batch_stats": model_setup["trained"][2]}
  alone_vars = heads.backbone_variables(variables)
  image = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  own = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), image)
  assert jax.tree.structure(alone_vars) == jax.tree.structure(own)
  assert heads.parameter_count(alone_vars["params"]) == heads.parameter_count(own["params"])
  assert heads.parameter_count(variables["params"]) > heads.parameter_count(own["params"])
  wrapped = evaluate(variables, images)
  alone = jax.jit(lambda v, x: backbone.apply(v, x, train=False))(alone_vars, images)
  np.testing.assert_array_equal(alone["logits"], wrapped["logits"])
  np.testing.assert_array_equal(alone["features"], wrapped["features"])


@pytest.mark.cross_device
def test_model_step_on_four_devices_matches_one_device(setup, model_setup):
  """The whole step over 4 devices: each device rotates its own slice, the heads' BatchNorm
  averages over all 4·B rows, the gradients are pmean'd, the tables are row-sharded."""
  _, _, model = _lenet_with_heads(bn_axis_name="data")
  step = _train_step(model, model_setup["method"], axis_name="data")
  state = model_setup["state"]
  specs = methods.partition_specs(state, "data")
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  sharded = jax.jit(jax.shard_map(
      lambda *args: step(*args)[:5], mesh=mesh,
      in_specs=(P(), P(), specs, P("data"), P("data")),
      out_specs=(P("data"), P(), P(), specs, P()), check_vma=False))
  variables = model_setup["variables"]
  results_4 = sharded(variables["params"], variables["batch_stats"], state,
                      model_setup["images"], setup["batch"])
  loss_4, grads_4, stats_4, state_4, metrics_4 = results_4
  loss_1, grads_1, stats_1, state_1, metrics_1, _ = model_setup["trained"]
  roundoff.assert_close_to_scale(loss_4, loss_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(grads_4, grads_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(stats_4, stats_1, roundoff.STEP_RTOL)
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.STEP_RTOL)
  assert set(metrics_4) == set(metrics_1)
  roundoff.assert_trees_close_to_scale(metrics_4, metrics_1, roundoff.STEP_RTOL)
