"""LSSKD (methods/lsskd.py): rotations, joint labels, per-head PS-KD tables, loss, sharding.

Everything is tiny: synthetic stage features (8×8×4 and 4×4×8), 6-d features, 3 classes
(12 joint classes), 8 examples of an 18-example dataset, HSAKD 'conv' heads.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax import methods
from selfkd_jax.methods.lsskd import (LSSKDState, joint_labels, joint_row_ids, lsskd,
                                      lsskd_aux_terms, rotate_batch)
from selfkd_jax.models.exits import make_exits
from numpy_reference import log_softmax, softmax

B, C, D, N, E = 8, 3, 6, 18, 4
R = 4
STAGES = ((8, 8, 4), (4, 4, 8))
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


# ----------------------------------------------------------------------------- pure pieces


def test_train_inputs_are_rotation_major_rot90s():
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  out = np.asarray(jax.jit(rotate_batch)(x))
  assert out.shape == (8, 5, 5, 3)
  np.testing.assert_array_equal(out[:2], x)
  for k in range(1, 4):
    np.testing.assert_array_equal(out[2 * k:2 * k + 2], np.rot90(x, k, axes=(1, 2)))
  assert not np.array_equal(out[2:4], x)
  with pytest.raises(ValueError, match="square"):
    rotate_batch(jnp.zeros((2, 4, 5, 3)))


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
  m, j, heads = 5, 12, 3
  z = [rng.normal(size=(m, j)).astype(np.float32) * 2 for _ in range(heads)]
  a = [rng.normal(size=(m, D)).astype(np.float32) for _ in range(heads)]
  f = rng.normal(size=(m, D)).astype(np.float32)
  q = [softmax(rng.normal(size=(m, j))).astype(np.float32) for _ in range(heads)]
  kw = dict(temperature=3.0, distill_weight=0.7, feature_weight=0.03, aux_weight=1.3)

  @jax.jit
  def run(z, f):
    per_row, terms = lsskd_aux_terms(z, a, f, q, **kw)
    g_z = jax.grad(lambda z: jnp.sum(lsskd_aux_terms(z, a, f, q, **kw)[1]["distill"]))(z)
    g_f = jax.grad(lambda f: jnp.sum(lsskd_aux_terms(z, a, f, q, **kw)[0]))(f)
    return per_row, terms, g_z, g_f

  per_row, terms, g, g_f = run(z, f)
  ce = [-(q[h] * log_softmax(z[h])).sum(-1) for h in range(heads)]
  kl = [_kl(z[-1], z[h], 3.0) for h in range(heads - 1)] + [np.zeros(m)]
  l2 = [np.sqrt(((a[h].astype(np.float64) - f) ** 2).sum(-1)) for h in range(heads)]
  want = sum(1.3 * ce[h] + 0.7 * kl[h] + 0.03 * l2[h] for h in range(heads))
  np.testing.assert_allclose(per_row, want, rtol=2e-5)
  np.testing.assert_allclose(terms["distill"], np.stack(kl), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(terms["feature"], np.stack(l2), rtol=2e-5)
  # Deep-to-shallow KL: the deepest head is the teacher only; the shallower ones learn.
  np.testing.assert_array_equal(g[-1], 0.0)
  assert all(float(np.abs(gh).max()) > 0 for gh in g[:-1])
  np.testing.assert_array_equal(g_f, 0.0)  # final features: sg


def test_constructor_validation():
  exits = make_exits("hsakd", STAGES, D, C)
  for kwargs, word in [({"alpha_T": 1.5}, "alpha_T"), ({"aux_alpha_T": -0.1}, "aux_alpha_T"),
                       ({"temperature": 0.0}, "temperature"),
                       ({"distill_weight": -1.0}, "distill_weight"),
                       ({"feature_weight": -1.0}, "feature_weight"),
                       ({"aux_weight": -1.0}, "aux_weight"),
                       ({"storage_dtype": jnp.float16}, "storage_dtype")]:
    with pytest.raises(ValueError, match=word):
      lsskd(exits, N, C, E, steps_per_epoch=1, **kwargs)
  with pytest.raises(ValueError, match="joint|rotation"):
    lsskd(make_exits("byot", STAGES, D, C), N, C, E, steps_per_epoch=1)  # C outputs, not 4C
  with pytest.raises(ValueError, match="positive"):
    lsskd(exits, 0, C, E, steps_per_epoch=1)
  with pytest.raises(ValueError, match="Exits"):
    lsskd(object(), N, C, E, steps_per_epoch=1)


# ----------------------------------------------------------------------------- method


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  # Per (example, rotation) synthetic model outputs.
  ex = {
      "logits": (2.0 * rng.normal(size=(B, R, C))).astype(np.float32),
      "features": np.maximum(rng.normal(size=(B, R, D)), 0).astype(np.float32),
      "stage_features": (np.maximum(rng.normal(size=(B, R, *STAGES[0])), 0).astype(np.float32),
                         np.maximum(rng.normal(size=(B, R, *STAGES[1])), 0).astype(np.float32)),
  }
  outputs = jax.tree.map(lambda x: jnp.asarray(_rotation_major(x)), ex)
  batch = {"label": jnp.asarray(LABELS), "index": jnp.asarray(INDEX)}
  exits = make_exits("hsakd", STAGES, D, C)  # 'conv' stage copies, a head on both stages
  method = lsskd(exits, N, C, E, steps_per_epoch=1)
  # Tables padded for 4 devices as the trainer does (main table: 18 -> 20 rows).
  state0 = methods.pad_tables(jax.jit(method.init)(jax.random.PRNGKey(1)), 4)
  update = jax.jit(method.update, static_argnames=("axis_name",))
  loss1, state1, metrics1 = update(state0, outputs, batch, step=0)
  loss2, state2, metrics2 = update(state1, outputs, batch, step=1)

  @jax.jit
  def heads_train(state, stage_features):
    (z, a), _ = exits.apply({"params": state.exit_params, "batch_stats": state.exit_batch_stats},
                            stage_features, train=True, mutable=["batch_stats"])
    return z, a

  return dict(ex=ex, outputs=outputs, batch=batch, exits=exits, method=method, update=update,
              state0=state0, state1=state1, state2=state2, loss1=loss1, loss2=loss2,
              metrics1=metrics1, metrics2=metrics2, heads_train=heads_train)


def _numpy_loss(setup, state_before, epoch, main_past, aux_past, main_pskd=True):
  """The full LSSKD loss in numpy from the heads' train-mode outputs and the given tables."""
  out = setup["outputs"]
  z_heads, a_heads = setup["heads_train"](state_before, out["stage_features"])
  z_heads = [np.asarray(z, np.float64) for z in z_heads]
  a_heads = [np.asarray(a, np.float64) for a in a_heads]
  f = np.asarray(out["features"], np.float64)
  alpha = 0.8 * (epoch + 1) / E
  y = LABELS
  main = np.asarray(out["logits"], np.float64)[:B]
  past = np.eye(C)[y] if epoch == 0 or not main_pskd else main_past[INDEX]
  alpha_main = alpha if main_pskd else 0.0  # main_pskd=False: plain CE
  main_loss = -(_targets(y, past, alpha_main) * log_softmax(main)).sum(-1)
  joint = np.concatenate([4 * y + k for k in range(R)])
  rows = np.concatenate([4 * INDEX + k for k in range(R)])
  per_row = np.zeros(R * B)
  for h, (z, a) in enumerate(zip(z_heads, a_heads)):
    past_h = np.eye(4 * C)[joint] if epoch == 0 else aux_past[h][rows]
    per_row += -(_targets(joint, past_h, alpha) * log_softmax(z)).sum(-1)
    per_row += 0.03 * np.sqrt(((a - f) ** 2).sum(-1))
    if h < len(z_heads) - 1:
      per_row += 1.0 * _kl(z_heads[-1], z, 3.0)
  return main_loss + per_row.reshape(R, B).mean(0), z_heads


def test_tables_written_at_rows_4i_plus_k_and_read_back_as_targets(setup):
  state0, state1 = setup["state0"], setup["state1"]
  assert isinstance(state1, LSSKDState) and len(state1.aux_predictions) == 2
  assert state1.main_predictions.rows.shape == (N + 2, C)  # padded
  assert all(t.rows.shape == (R * N, R * C) for t in state1.aux_predictions)
  # Step 1 (epoch 0): one-hot targets; the tables receive this step's predictions.
  want1, z_heads = _numpy_loss(setup, state0, 0, None, None)
  assert setup["loss1"].shape == (B,)
  np.testing.assert_allclose(setup["loss1"], want1, rtol=2e-5)
  main_rows = np.asarray(state1.main_predictions.rows)
  np.testing.assert_allclose(main_rows[INDEX],
                             softmax(np.asarray(setup["outputs"]["logits"])[:B]), rtol=1e-5)
  untouched = np.setdiff1d(np.arange(N + 2), INDEX)
  np.testing.assert_array_equal(main_rows[untouched], 0.0)
  for h, table in enumerate(state1.aux_predictions):
    rows = np.asarray(table.rows)
    for k in range(R):
      np.testing.assert_allclose(rows[4 * INDEX + k], softmax(z_heads[h][k * B:(k + 1) * B]),
                                 rtol=1e-5, atol=1e-7)
    written = np.concatenate([4 * INDEX + k for k in range(R)])
    np.testing.assert_array_equal(np.delete(rows, written, axis=0), 0.0)
  # Step 2 (epoch 1): the written rows are the targets' past predictions.
  aux_past = [np.asarray(t.rows, np.float64) for t in state1.aux_predictions]
  want2, _ = _numpy_loss(setup, state1, 1, main_rows.astype(np.float64), aux_past)
  np.testing.assert_allclose(setup["loss2"], want2, rtol=2e-5)
  # ... and would differ with one-hot targets (the read-back matters).
  onehot2, _ = _numpy_loss(setup, state1, 0, None, None)
  assert not np.allclose(want2, onehot2, rtol=1e-3)
  np.testing.assert_allclose(setup["metrics2"]["lsskd_alpha"], 0.8 * 2 / E, rtol=1e-6)


def test_gradients_and_the_heads_step(setup):
  method, state0, batch = setup["method"], setup["state0"], setup["batch"]

  @jax.jit
  def grads(exit_params, outputs):
    def mean_loss(exit_params, outputs):
      s = state0._replace(exit_params=exit_params)
      return jnp.mean(method.update(s, outputs, batch, step=0)[0])
    return jax.grad(mean_loss, argnums=(0, 1))(exit_params, outputs)

  g_exit, g_out = grads(state0.exit_params, setup["outputs"])
  g_logits = np.asarray(g_out["logits"])
  # Main classifier: CE (epoch 0, one-hot) on the un-rotated rows only.
  probs = softmax(np.asarray(setup["outputs"]["logits"])[:B])
  np.testing.assert_allclose(g_logits[:B], (probs - np.eye(C)[LABELS]) / B, atol=1e-6)
  np.testing.assert_array_equal(g_logits[B:], 0.0)
  np.testing.assert_array_equal(g_out["features"], 0.0)
  for s in g_out["stage_features"]:  # the backbone learns from every rotation via the heads
    per_rotation = np.abs(np.asarray(s)).reshape(R, B, -1).max(axis=(1, 2))
    assert (per_rotation > 0).all()
  # The heads' step uses exactly the gradient of the returned loss (sgd 0.1, momentum 0.9).
  moved = jax.tree.map(lambda a, b: a - b, setup["state1"].exit_params, state0.exit_params)
  for m, g in zip(jax.tree.leaves(moved), jax.tree.leaves(g_exit)):
    np.testing.assert_allclose(m, -0.1 * g, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_exit["adapter1"]["kernel"]).max()) > 0.0
  stats0 = jax.tree.leaves(state0.exit_batch_stats)
  stats1 = jax.tree.leaves(setup["state1"].exit_batch_stats)
  assert stats0 and all(not np.allclose(a, b) for a, b in zip(stats0, stats1))


def test_metrics(setup):
  m = setup["metrics1"]
  assert {"lsskd_exit1_accuracy", "lsskd_exit2_accuracy", "lsskd_exit1_class_accuracy",
          "lsskd_aux_ce", "lsskd_distill", "lsskd_feature_loss", "lsskd_main_loss"} <= set(m)
  z_heads, a_heads = setup["heads_train"](setup["state0"], setup["outputs"]["stage_features"])
  joint = np.concatenate([4 * LABELS + k for k in range(R)])
  np.testing.assert_allclose(m["lsskd_exit1_accuracy"],
                             np.mean(np.argmax(z_heads[0], -1) == joint), atol=1e-7)
  np.testing.assert_allclose(m["lsskd_distill"], _kl(np.asarray(z_heads[1]),
                                                     np.asarray(z_heads[0]), 3.0).mean(),
                             rtol=2e-5)


def test_exit_logits_pick_rotation_zero_columns(setup):
  state, exits = setup["state1"], setup["exits"]
  plain = tuple(s[:B] for s in setup["outputs"]["stage_features"])
  got = jax.jit(setup["method"].exit_logits)(state, {"stage_features": plain})
  assert set(got) == {"exit1", "exit2"}
  manual, _ = exits.apply({"params": state.exit_params, "batch_stats": state.exit_batch_stats},
                          plain, train=False)
  for name, z in zip(("exit1", "exit2"), manual):
    assert got[name].shape == (B, C)
    np.testing.assert_allclose(got[name], np.asarray(z)[:, [4 * y for y in range(C)]],
                               rtol=1e-6)


def test_table_bytes():
  exits = make_exits("hsakd", STAGES, D, C)
  fp32 = jax.eval_shape(lsskd(exits, N, C, E, steps_per_epoch=1).init)
  bf16 = jax.eval_shape(lsskd(exits, N, C, E, steps_per_epoch=1, storage_dtype=jnp.bfloat16,
                              main_pskd=False).init)
  assert bf16.main_predictions is None
  assert all(t.rows.dtype == jnp.bfloat16 for t in bf16.aux_predictions)
  assert methods.table_bytes(fp32) == (N * C + 2 * R * N * R * C) * 4
  assert methods.table_bytes(bf16, 4) == 2 * R * N * R * C * 2 // 4


@pytest.mark.cross_device
@pytest.mark.parametrize("variant", ["pskd_fp32", "ce_bf16"])
def test_four_devices_match_one_device(setup, variant):
  """shard_map over 4 devices (row-sharded tables, cross-device head BN, pmean'd head
  gradients) gives the 1-device result for the same global batch, at epoch 1 (tables read).

  'ce_bf16': plain CE on the main head, bf16 tables; its 1-device result is also checked
  against numpy with the bf16 past predictions."""
  ex, batch = setup["ex"], setup["batch"]
  if variant == "pskd_fp32":
    method, state = setup["method"], setup["state1"]
    loss_1, state_1 = setup["loss2"], setup["state2"]  # the same step on one device
  else:
    method = lsskd(setup["exits"], N, C, E, steps_per_epoch=1, main_pskd=False,
                   storage_dtype=jnp.bfloat16)
    state = setup["state1"]._replace(
        main_predictions=None,
        aux_predictions=tuple(methods.PerExampleTable(t.rows.astype(jnp.bfloat16))
                              for t in setup["state1"].aux_predictions))

  def step(state, outputs, batch, axis_name):
    return method.update(state, outputs, batch, step=1, axis_name=axis_name)

  if variant == "ce_bf16":
    loss_1, state_1, _ = jax.jit(functools.partial(step, axis_name=None))(
        state, setup["outputs"], batch)
    assert all(t.rows.dtype == jnp.bfloat16 for t in state_1.aux_predictions)
    aux_past = [np.asarray(t.rows.astype(jnp.float32), np.float64)
                for t in state.aux_predictions]
    want, z_heads = _numpy_loss(setup, state, 1, None, aux_past, main_pskd=False)
    np.testing.assert_allclose(loss_1, want, rtol=2e-5)
    written = np.asarray(state_1.aux_predictions[1].rows[4 * INDEX + 2].astype(jnp.float32))
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
