"""A user's own data-parallel loop, as the README shows it: a plain-JAX MLP with PS-KD (a
per-example table) run by `shard_map` over 4 fake devices and by `pmap` over 4 equals the same
loop on 1 device; so does a Flax model with LSSKD's heads (the other method with tables, and a
head with BatchNorm); and the `check_vma` trap the README warns about is real."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import roundoff
from selfkd_jax import heads, methods, models

NUM_EXAMPLES, NUM_CLASSES, FEATURES, BATCH, EPOCHS = 64, 5, 12, 16, 3
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH


def mlp(params, x):
  return jnp.tanh(x @ params["hidden"]) @ params["out"]


def make_train_step(method, tx, axis_name=None):
  """The README's train step: per-device body, gradients averaged with pmean."""

  def train_step(params, opt_state, method_state, batch, step):
    def loss_fn(params):
      outputs = {"logits": mlp(params, batch["image"])}
      per_example, new_state, _ = method.update(method_state, outputs, batch, step=step,
                                                axis_name=axis_name)
      return per_example.mean(), new_state

    (loss, method_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name is not None:  # equal batch slices: the mean of means is the global mean
      grads, loss = jax.lax.pmean((grads, loss), axis_name)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, method_state, loss

  return train_step


def data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(NUM_EXAMPLES, FEATURES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32)
  params = {"hidden": jnp.asarray(rng.normal(size=(FEATURES, 16)) / 4, jnp.float32),
            "out": jnp.asarray(rng.normal(size=(16, NUM_CLASSES)) / 4, jnp.float32)}
  return images, labels, params


def batches():
  for epoch in range(EPOCHS):
    order = np.random.default_rng([1, epoch]).permutation(NUM_EXAMPLES)
    for start in range(0, NUM_EXAMPLES, BATCH):
      yield order[start:start + BATCH].astype(np.int32)


def run(mode):
  images, labels, params = data()
  method = methods.pskd(NUM_EXAMPLES, NUM_CLASSES, EPOCHS, steps_per_epoch=STEPS_PER_EPOCH)
  tx = optax.sgd(0.5, momentum=0.9)
  opt_state, method_state = tx.init(params), method.init()
  if mode == "single":
    step_fn = jax.jit(make_train_step(method, tx))
  elif mode == "shard_map":
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    method_state = methods.shard_state(method_state, mesh)
    specs = methods.partition_specs(method_state)
    step_fn = jax.jit(jax.shard_map(
        make_train_step(method, tx, axis_name="data"), mesh=mesh,
        in_specs=(P(), P(), specs, P("data"), P()), out_specs=(P(), P(), specs, P()),
        check_vma=False))
  else:
    params, opt_state, method_state = methods.to_pmap_layout((params, opt_state, method_state), 4)
    step_fn = jax.pmap(make_train_step(method, tx, axis_name="data"), axis_name="data",
                       devices=jax.devices()[:4])
  for step, index in enumerate(batches()):
    batch = {"image": images[index], "label": labels[index], "index": index}
    step_arg = step
    if mode == "pmap":
      batch = jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
      step_arg = np.full((4,), step)
    params, opt_state, method_state, loss = step_fn(params, opt_state, method_state, batch,
                                                    step_arg)
  if mode == "pmap":
    params, opt_state, method_state = methods.from_pmap_layout((params, opt_state, method_state))
  return jax.device_get((params, opt_state, method_state))


@pytest.mark.cross_device
def test_shard_map_and_pmap_loops_equal_the_single_device_loop():
  reference = run("single")
  rows = np.asarray(reference[2].past_predictions.rows)
  np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)  # every example's row was written
  for mode in ("shard_map", "pmap"):
    other = run(mode)
    assert other[2].past_predictions.rows.shape == (NUM_EXAMPLES, NUM_CLASSES)  # 64 = 4 x 16
    # 12 steps of a small MLP: only the order of the batch and device sums differs.
    roundoff.assert_trees_close_to_scale(other, reference, roundoff.RUN_RTOL)


def run_lsskd(mode):
  """LSSKD in a user's Linen loop: the MLP with HSAKD heads (BatchNorm inside), the model run
  on the four rotations of 4×4 images, tables sharded by rows under `shard_map`."""
  axis = "data" if mode == "shard_map" else None
  backbone = models.MLP(num_classes=NUM_CLASSES, hidden_sizes=(8, 8))
  head = heads.exit_head_for("hsakd", backbone, (4, 4, 1), NUM_CLASSES, bn_axis_name=axis)
  model = heads.with_heads(backbone, head)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(NUM_EXAMPLES, 4, 4, 1)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32)
  variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
  method = methods.lsskd(NUM_EXAMPLES, NUM_CLASSES, EPOCHS, num_heads=head.exits.num_exits,
                         steps_per_epoch=STEPS_PER_EPOCH)
  tx = optax.sgd(0.1, momentum=0.9)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state, method_state = tx.init(params), method.init()

  def train_step(params, batch_stats, opt_state, method_state, batch, step):
    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                     methods.rotate_batch(batch["image"]), train=True,
                                     mutable=["batch_stats"])
      per_example, new_state, _ = method.update(method_state, outputs, batch, step=step,
                                                axis_name=axis)
      return per_example.mean(), (new_state, updates["batch_stats"])

    (_, (method_state, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis is not None:
      grads = jax.lax.pmean(grads, axis)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, method_state

  if mode == "single":
    step_fn = jax.jit(train_step)
  else:
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    method_state = methods.shard_state(method_state, mesh)
    specs = methods.partition_specs(method_state)
    step_fn = jax.jit(jax.shard_map(
        train_step, mesh=mesh, in_specs=(P(), P(), P(), specs, P("data"), P()),
        out_specs=(P(), P(), P(), specs), check_vma=False))
  state = (params, batch_stats, opt_state, method_state)
  for step, index in enumerate(batches()):
    batch = {"image": images[index], "label": labels[index], "index": index}
    state = step_fn(*state, batch, step)
  return jax.device_get(state)


@pytest.mark.cross_device
def test_lsskd_heads_in_a_shard_map_loop_equal_the_single_device_loop():
  reference = run_lsskd("single")
  tables = reference[3].aux_predictions
  assert len(tables) == 2 and tables[0].rows.shape == (4 * NUM_EXAMPLES, 4 * NUM_CLASSES)
  np.testing.assert_allclose(np.asarray(tables[0].rows).sum(-1), 1.0, rtol=1e-5)  # all written
  roundoff.assert_trees_close_to_scale(run_lsskd("shard_map"), reference, roundoff.RUN_RTOL)


def test_layouts_round_trip_and_pad():
  method = methods.pskd(10, 3, 2, steps_per_epoch=1)
  state = (method.init(), {"w": jnp.arange(3.0)})
  pmap_state = methods.to_pmap_layout(state, 4)
  assert pmap_state[0].past_predictions.rows.shape == (4, 3, 3)  # 10 rows padded to 12
  assert pmap_state[1]["w"].shape == (4, 3)
  back = methods.from_pmap_layout(pmap_state)
  np.testing.assert_array_equal(back[1]["w"], state[1]["w"])
  assert back[0].past_predictions.rows.shape == (12, 3)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  sharded = methods.shard_state(state, mesh)
  rows = sharded[0].past_predictions.rows
  assert rows.shape == (12, 3)
  assert {s.data.shape for s in rows.addressable_shards} == {(3, 3)}  # 3 rows per device
  assert sharded[1]["w"].sharding.is_fully_replicated


def test_check_vma_true_with_pmean_scales_gradients_by_the_device_count():
  """Why the README's shard_map step passes check_vma=False: with the default True, the
  gradient of a replicated parameter comes back already summed over devices, and the usual
  pmean on top leaves it D times too large, silently."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  x = jnp.arange(8.0)

  def grad_body(w, x):
    return jax.lax.pmean(jax.grad(lambda w: jnp.mean(w * x))(w), "data")

  grads = {check: jax.jit(jax.shard_map(grad_body, mesh=mesh, in_specs=(P(), P("data")),
                                        out_specs=P(), check_vma=check))(1.0, x)
           for check in (False, True)}
  assert float(grads[False]) == pytest.approx(float(jnp.mean(x)))
  assert float(grads[True]) == pytest.approx(4 * float(jnp.mean(x)))
