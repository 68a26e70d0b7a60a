"""Method transforms: PS-KD against hand computations, sharded per-example state, combine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import roundoff
from selfkd_jax import methods
from numpy_reference import log_softmax, softmax


STEPS_PER_EPOCH = 5


def _update(method, state, logits, labels, index, step, axis_name=None):
  return method.update(state, {"logits": logits}, {"label": labels, "index": index},
                       step=jnp.asarray(step), axis_name=axis_name)


def _pskd(num_examples, num_classes, total_epochs, **kwargs):
  return methods.pskd(num_examples, num_classes, total_epochs, steps_per_epoch=STEPS_PER_EPOCH,
                      **kwargs)


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


class TestPSKD:

  def test_first_visit_is_one_hot_and_records_softmax(self):
    rng = np.random.default_rng(0)
    method = _pskd(num_examples=6, num_classes=3, total_epochs=4, alpha_T=0.8)
    state = method.init()
    logits = rng.normal(size=(2, 3)).astype(np.float32)
    labels, index = np.array([2, 0]), np.array([4, 1])
    loss, state, metrics = jax.jit(functools.partial(_update, method))(
        state, logits, labels, index, 0)
    expected_ce = -log_softmax(logits)[np.arange(2), labels]
    np.testing.assert_allclose(loss, expected_ce, rtol=1e-6)
    table = np.asarray(state.past_predictions.rows)
    np.testing.assert_allclose(table[[4, 1]], softmax(logits), rtol=1e-6)
    np.testing.assert_array_equal(table[[0, 2, 3, 5]], 0.0)  # untouched rows
    np.testing.assert_allclose(metrics["pskd_alpha"], 0.8 * 1 / 4, rtol=1e-6)

  @pytest.mark.parametrize("step", [3 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH + 4])
  def test_later_epoch_mixes_past_predictions(self, step):
    rng = np.random.default_rng(1)
    method = _pskd(num_examples=5, num_classes=4, total_epochs=10, alpha_T=0.8)
    past = softmax(rng.normal(size=(5, 4))).astype(np.float32)
    state = methods.PSKDState(methods.PerExampleTable(jnp.asarray(past)))
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    labels, index = np.array([1, 3, 0]), np.array([2, 0, 4])
    loss, new_state, metrics = _update(method, state, logits, labels, index, step=step)
    alpha = 0.8 * (3 + 1) / 10  # epoch 3 of 10, from the step and steps_per_epoch
    np.testing.assert_allclose(metrics["pskd_alpha"], alpha, rtol=1e-6)
    targets = (1 - alpha) * np.eye(4)[labels] + alpha * past[index]
    expected = -(targets * log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    new_rows = np.asarray(new_state.past_predictions.rows)
    np.testing.assert_allclose(new_rows[index], softmax(logits), rtol=1e-6)
    np.testing.assert_array_equal(new_rows[[1, 3]], past[[1, 3]])

  def test_an_example_first_seen_in_a_later_epoch_gets_a_one_hot_target(self):
    """The table, not the epoch, says an example is new: a row never written (a sampler that
    skipped it in epoch 0) gives one-hot, not `(1 - α) onehot + α 0` (which sums to 1 - α)."""
    rng = np.random.default_rng(5)
    method = _pskd(num_examples=4, num_classes=3, total_epochs=4)
    past = np.zeros((4, 3), np.float32)
    past[1] = softmax(rng.normal(size=3))
    state = methods.PSKDState(methods.PerExampleTable(jnp.asarray(past)))
    logits = rng.normal(size=(2, 3)).astype(np.float32)
    labels, index = np.array([2, 0]), np.array([3, 1])  # 3: never written; 1: written
    loss, _, _ = _update(method, state, logits, labels, index, step=2 * STEPS_PER_EPOCH)
    alpha = 0.8 * 3 / 4
    log_p = log_softmax(logits)
    expected = [-log_p[0, 2],
                -(((1 - alpha) * np.eye(3)[0] + alpha * past[1]) * log_p[1]).sum()]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

  def test_alpha_never_exceeds_alpha_T(self):
    """Steps past the schedule (a longer run, epochs counted from 1) keep alpha at alpha_T."""
    method = _pskd(num_examples=2, num_classes=2, total_epochs=3, alpha_T=0.6)
    state = method.init()
    alphas = [float(_update(method, state, jnp.zeros((1, 2)), jnp.array([0]), jnp.array([0]),
                            step=epoch * STEPS_PER_EPOCH)[2]["pskd_alpha"])
              for epoch in range(6)]
    np.testing.assert_allclose(alphas, [0.2, 0.4, 0.6, 0.6, 0.6, 0.6], rtol=1e-6)

  def test_no_gradient_flows_into_past_predictions(self):
    method = _pskd(num_examples=3, num_classes=3, total_epochs=2)
    labels, index = jnp.array([0, 1]), jnp.array([0, 2])
    logits = jnp.array([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]])

    def loss_of_table(rows):
      state = methods.PSKDState(methods.PerExampleTable(rows))
      return _update(method, state, logits, labels, index, step=STEPS_PER_EPOCH)[0].sum()

    grad = jax.grad(loss_of_table)(jnp.full((3, 3), 1 / 3))
    np.testing.assert_array_equal(grad, 0.0)

  def test_bfloat16_storage(self):
    method = _pskd(num_examples=4, num_classes=3, total_epochs=2, storage_dtype=jnp.bfloat16)
    state = method.init()
    assert state.past_predictions.value_dtype == jnp.bfloat16
    assert state.past_predictions.rows.dtype == jnp.uint16  # stored as bits, written in place
    logits = jnp.array([[2.0, 0.0, -1.0]])
    _, state, _ = _update(method, state, logits, jnp.array([0]), jnp.array([3]), step=0)
    np.testing.assert_allclose(np.asarray(state.past_predictions.values()[3], np.float32),
                               softmax(np.asarray(logits))[0], rtol=1e-2)

  def test_epoch_end_eval_refresh_leaves_table_during_steps(self):
    method = _pskd(num_examples=4, num_classes=2, total_epochs=2, refresh="epoch_end_eval")
    assert method.refresh is not None
    state = method.init()
    logits = jnp.array([[1.0, -1.0]])
    _, state, _ = _update(method, state, logits, jnp.array([0]), jnp.array([2]),
                          step=STEPS_PER_EPOCH)
    np.testing.assert_array_equal(state.past_predictions.rows, 0.0)
    state = method.refresh(state, {"logits": logits}, {"index": jnp.array([2])})
    np.testing.assert_allclose(state.past_predictions.rows[2], softmax(np.array([1.0, -1.0])),
                               rtol=1e-6)

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="alpha_T"):
      _pskd(10, 3, 5, alpha_T=1.5)
    with pytest.raises(ValueError, match="refresh"):
      _pskd(10, 3, 5, refresh="sometimes")
    for bad in (None, 0, 2.5, True):
      with pytest.raises(ValueError, match="pskd: the alpha schedule needs steps_per_epoch"):
        methods.pskd(10, 3, 5, steps_per_epoch=bad)
    methods.pskd(10, 3, 5, steps_per_epoch=np.int64(4))  # numpy integers are integers


class TestIndexChecks:

  def test_out_of_range_index_is_silent_by_default_and_an_error_when_checked(self):
    method = _pskd(num_examples=4, num_classes=2, total_epochs=2)
    args = (method.init(), jnp.zeros((2, 2)), jnp.array([0, 1]))
    bad, good = jnp.array([1, 4]), jnp.array([1, 3])  # 4: a 1-based index past the end
    jax.block_until_ready(jax.jit(functools.partial(_update, method))(*args, bad, 0))
    methods.set_index_checks(True)
    try:
      checked = jax.jit(functools.partial(_update, method))
      jax.block_until_ready(checked(*args, good, 0))
      with pytest.raises(Exception, match=r"batch\['index'\] holds 4, outside the table's "
                                          r"rows 0\.\.3"):
        jax.block_until_ready(checked(*args, bad, 0))
      # Sharded over 4 devices: the range is the whole table's (8 rows when padded to 8).
      mesh = _mesh(4)
      state = methods.shard_state(_pskd(num_examples=8, num_classes=2, total_epochs=2).init(),
                                  mesh)

      def sharded(state, *batch):
        return jax.jit(jax.shard_map(
            lambda s, z, y, i: _update(method, s, z, y, i, 0, axis_name="data")[0], mesh=mesh,
            in_specs=(methods.partition_specs(state), P("data"), P("data"), P("data")),
            out_specs=P("data"), check_vma=False))(state, *batch)

      z, y = jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32)
      jax.block_until_ready(sharded(state, z, y, jnp.array([7, 0, 5, 2])))
      with pytest.raises(Exception, match="holds 8, outside the table's rows 0..7"):
        jax.block_until_ready(sharded(state, z, y, jnp.array([7, 8, 5, 2])))
      # 7 examples on 4 devices: padded to 8 rows, the last one padding, not an example.
      padded = methods.shard_state(_pskd(num_examples=7, num_classes=2, total_epochs=2).init(),
                                   mesh)
      assert padded.past_predictions.rows.shape == (8, 2)
      jax.block_until_ready(sharded(padded, z, y, jnp.array([6, 0, 5, 2])))
      with pytest.raises(Exception, match="holds 7, outside the table's rows 0..6"):
        jax.block_until_ready(sharded(padded, z, y, jnp.array([6, 7, 5, 2])))
    finally:
      methods.set_index_checks(False)


class TestInputChecks:
  """Mistakes that used to broadcast into a finite loss, or fail deep inside with a shape error,
  are refused at trace time naming the method and what it needs."""

  LOGITS = jnp.zeros((4, 3))

  def _methods(self):
    return {"pskd": _pskd(num_examples=8, num_classes=3, total_epochs=2),
            "label_smoothing": methods.label_smoothing(0.1),
            "cross_entropy": methods.cross_entropy(),
            "lsrkd": methods.lsrkd()}

  def test_a_label_column_is_refused_instead_of_a_batch_by_batch_loss(self):
    for name, method in self._methods().items():
      good = _update(method, method.init(), self.LOGITS, jnp.array([0, 1, 2, 0]),
                     jnp.arange(4), 0)[0]
      assert good.shape == (4,), name
      with pytest.raises(ValueError, match=rf"{name}: batch\['label'\] must be integer class "
                                           r"ids .* of shape \(4,\), got int32 of shape "
                                           r"\(4, 1\)"):
        _update(method, method.init(), self.LOGITS, jnp.array([[0], [1], [2], [0]]),
                jnp.arange(4), 0)
      with pytest.raises(ValueError, match=rf"{name}: .*not one-hot.* got float32 of shape "
                                           r"\(4, 3\)"):
        _update(method, method.init(), self.LOGITS, jax.nn.one_hot(jnp.arange(4) % 3, 3),
                jnp.arange(4), 0)

  def test_missing_index_uninitialised_state_and_wrong_width(self):
    method = _pskd(num_examples=8, num_classes=3, total_epochs=2)
    labels = jnp.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"pskd: needs batch\['index'\], each example's 0-based "
                                         r"position .* the batch has 'label'"):
      method.update(method.init(), {"logits": self.LOGITS}, {"label": labels}, step=0)
    for state, got in ((None, "NoneType"), (method.init, "function")):
      with pytest.raises(TypeError, match=rf"pskd: state must be the PSKDState returned by "
                                          rf"method.init\(rng\).* got {got}"):
        _update(method, state, self.LOGITS, labels, jnp.arange(4), 0)
    with pytest.raises(ValueError, match=r"pskd: outputs\['logits'\] has 5 classes .* "
                                         r"num_classes=3"):
      _update(method, method.init(), jnp.zeros((4, 5)), labels, jnp.arange(4), 0)


class TestPSKDSeen:

  def test_seen_share_and_a_refresh_never_called(self):
    """`pskd_seen` is the share of the batch with a recorded prediction; with
    refresh='epoch_end_eval' only `method.refresh` records one, so a loop that never calls it
    shows 0 in the second epoch (and trains with one-hot targets)."""
    labels, index = jnp.array([0, 1]), jnp.array([3, 5])
    logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    for refresh, second_epoch_seen in (("step", 1.0), ("epoch_end_eval", 0.0)):
      method = _pskd(num_examples=8, num_classes=3, total_epochs=2, refresh=refresh)
      loss0, state, metrics = _update(method, method.init(), logits, labels, index, 0)
      assert float(metrics["pskd_seen"]) == 0.0, refresh
      loss1, state, metrics = _update(method, state, logits, labels, index, STEPS_PER_EPOCH)
      assert float(metrics["pskd_seen"]) == second_epoch_seen, refresh
      if refresh == "epoch_end_eval":  # no refresh: still one-hot targets, i.e. CE
        np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
        state = method.refresh(state, {"logits": logits}, {"index": index})
        _, _, metrics = _update(method, state, logits, labels, jnp.array([3, 0]),
                                STEPS_PER_EPOCH)
        assert float(metrics["pskd_seen"]) == 0.5


class TestMethodIsStatic:

  def test_hashable_static_argument_and_closure(self):
    method = _pskd(num_examples=4, num_classes=2, total_epochs=2)
    assert hash(method) == hash(method) and method == method
    state = method.init()
    args = (jnp.zeros((1, 2)), jnp.array([0]), jnp.array([1]), 0)
    as_static = jax.jit(_update, static_argnames="method")(method=method, state=state,
                                                           logits=args[0], labels=args[1],
                                                           index=args[2], step=args[3])
    closed = jax.jit(functools.partial(_update, method))(state, *args)
    for a, b in zip(jax.tree.leaves(as_static), jax.tree.leaves(closed)):
      np.testing.assert_array_equal(a, b)

  def test_a_method_passed_like_an_array_stays_static(self):
    method = _pskd(num_examples=4, num_classes=2, total_epochs=2)
    assert jax.tree.leaves({"method": method}) == []  # nothing of it is ever traced
    traces = []

    def step(method, state, *args):
      traces.append(1)
      return _update(method, state, *args)

    jitted = jax.jit(step)
    state = method.init()
    args = (jnp.zeros((1, 2)), jnp.array([0]), jnp.array([1]), 0)
    first = jitted(method, state, *args)
    again = jitted(method, state, *args)
    other = jitted(methods.combine([1.0], method), (state,), *args)  # another method: retrace
    assert len(traces) == 2
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(other[0], first[0])

  def test_nnx_jit_takes_a_method_as_a_static_argument(self):
    from flax import nnx
    method = methods.cross_entropy()
    loss = nnx.jit(lambda method, logits, labels: method.update(
        method.init(), {"logits": logits}, {"label": labels}, step=0)[0],
        static_argnames="method")(method, jnp.zeros((2, 3)), jnp.array([0, 1]))
    np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)


class TestShardedTables:

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_gather_and_scatter_match_plain_indexing(self, dtype):
    num_devices, num_examples, width = 4, 10, 3
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(num_examples, width)).astype(np.float32)
    table = methods.pad_tables(methods.PerExampleTable.from_values(jnp.asarray(rows), dtype),
                               num_devices)
    assert table.rows.shape == (12, width)
    index = jnp.asarray(rng.permutation(num_examples)[:8], jnp.int32)  # global batch of 8
    values = jnp.asarray(rng.normal(size=(8, width)), jnp.float32)

    mesh = _mesh(num_devices)
    spec = methods.partition_specs(table)

    def body(table, index, values):
      read = methods.gather_rows(table, index, "data")
      return read, methods.scatter_rows(table, index, values, "data")

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, P("data"), P("data")),
                                    out_specs=(P("data"), spec), check_vma=False))
    table = jax.device_put(table, NamedSharding(mesh, P("data")))
    read, written = sharded(table, index, values)

    plain_read = methods.gather_rows(table, index)
    plain_written = methods.scatter_rows(table, index, values)
    np.testing.assert_array_equal(np.asarray(read, np.float32),
                                  np.asarray(plain_read, np.float32))
    np.testing.assert_array_equal(np.asarray(written.values(), np.float32),
                                  np.asarray(plain_written.values(), np.float32))
    # And plain indexing is what it claims to be.
    np.testing.assert_array_equal(np.asarray(plain_read, np.float32),
                                  np.asarray(jnp.asarray(rows, dtype), np.float32)[index])

  @pytest.mark.cross_device
  def test_pskd_update_on_four_devices_equals_one(self):
    rng = np.random.default_rng(3)
    method = _pskd(num_examples=16, num_classes=5, total_epochs=4)
    past = softmax(rng.normal(size=(16, 5))).astype(np.float32)
    state = methods.PSKDState(methods.PerExampleTable(jnp.asarray(past)))
    logits = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    index = jnp.asarray(rng.permutation(16)[:8], jnp.int32)

    step = 2 * STEPS_PER_EPOCH
    single_loss, single_state, _ = _update(method, state, logits, labels, index, step)

    mesh = _mesh(4)
    spec = methods.partition_specs(state)

    def body(state, logits, labels, index):
      loss, new_state, _ = _update(method, state, logits, labels, index, step,
                                   axis_name="data")
      return loss, new_state

    sharded = jax.jit(jax.shard_map(body, mesh=mesh,
                                    in_specs=(spec, P("data"), P("data"), P("data")),
                                    out_specs=(P("data"), spec), check_vma=False))
    loss, new_state = sharded(state, logits, labels, index)
    # Per-example arithmetic on 2 rows per device instead of 8: XLA may vectorise the
    # softmax sums differently, so equal to round-off (the row moves are exact, see
    # test_gather_and_scatter_match_plain_indexing).
    roundoff.assert_close_to_scale(loss, single_loss, roundoff.STEP_RTOL)
    roundoff.assert_close_to_scale(new_state.past_predictions.rows,
                                   single_state.past_predictions.rows, roundoff.STEP_RTOL)

  def test_init_sharded_pads_any_row_count(self):
    """9 examples on 4 devices: built padded to 12 rows, 3 per device, equal to sharding the
    plain init; without the padding inside, out_shardings refuses 9 rows on 4 devices."""
    mesh = _mesh(4)
    method = _pskd(num_examples=9, num_classes=3, total_epochs=2)
    state = methods.init_sharded(method.init, mesh)
    rows = state.past_predictions.rows
    assert rows.shape == (12, 3)
    assert {shard.data.shape for shard in rows.addressable_shards} == {(3, 3)}
    expected = methods.shard_state(method.init(), mesh)
    assert jax.tree.structure(state) == jax.tree.structure(expected)
    np.testing.assert_array_equal(rows, expected.past_predictions.rows)
    with pytest.raises(ValueError, match="divisible|divide"):
      jax.jit(method.init, out_shardings=methods.state_shardings(
          jax.eval_shape(method.init), mesh))()

  def test_table_bytes(self):
    state = (methods.create_table(100, (10,), jnp.bfloat16), {"other": jnp.zeros(3)})
    assert methods.table_bytes(state) == 100 * 10 * 2
    assert methods.table_bytes(state, num_shards=4) == 100 * 10 * 2 // 4


class TestBaselinesAndCombine:

  def test_cross_entropy_and_label_smoothing(self):
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    log_p = log_softmax(logits)
    ce, _, _ = _update(methods.cross_entropy(), methods.stateless_init(), logits, labels,
                       None, 0)
    np.testing.assert_allclose(ce, -log_p[[0, 1], labels], rtol=1e-6)
    ls, _, _ = _update(methods.label_smoothing(0.3), methods.stateless_init(), logits, labels,
                       None, 0)
    targets = 0.7 * np.eye(3)[labels] + 0.1
    np.testing.assert_allclose(ls, -(targets * log_p).sum(-1), rtol=1e-6)
    ls_ex, _, _ = _update(methods.label_smoothing(0.3, exclude_target=True),
                          methods.stateless_init(), logits, labels, None, 0)
    targets = 0.7 * np.eye(3)[labels] + 0.15 * (1 - np.eye(3)[labels])
    np.testing.assert_allclose(ls_ex, -(targets * log_p).sum(-1), rtol=1e-6)

  def test_combine_weights_states_and_metric_names(self):
    pskd = _pskd(num_examples=4, num_classes=3, total_epochs=2)
    method = methods.combine([1.0, 0.5, 2.0], methods.cross_entropy(), pskd, pskd)
    past = np.array([0.2, 0.5, 0.3], np.float32)  # example 1's past prediction in both tables
    table = methods.PSKDState(methods.PerExampleTable(jnp.zeros((4, 3)).at[1].set(past)))
    state = (method.init()[0], table, table)
    logits = jnp.array([[1.0, 0.0, -1.0]])
    labels, index = jnp.array([2]), jnp.array([1])
    loss, new_state, metrics = _update(method, state, logits, labels, index, STEPS_PER_EPOCH)
    log_p = log_softmax(np.asarray(logits))[0]
    ce = -log_p[2]
    alpha = 0.8 * 2 / 2  # epoch 1 of 2
    pskd_loss = -(((1 - alpha) * np.eye(3)[2] + alpha * past) * log_p).sum()
    expected = ce + 0.5 * pskd_loss + 2.0 * pskd_loss
    np.testing.assert_allclose(loss, [expected], rtol=1e-5)
    assert len(new_state) == 3
    np.testing.assert_allclose(new_state[1].past_predictions.rows[1],
                               softmax(np.asarray(logits))[0], rtol=1e-6)
    assert set(metrics) == {"pskd_alpha", "2/pskd_alpha", "pskd_seen", "2/pskd_seen"}
    assert metrics["pskd_seen"] == metrics["2/pskd_seen"] == 1.0  # row 1 was written
    assert method.refresh is None
    with pytest.raises(ValueError, match="weights"):
      methods.combine([1.0], pskd, pskd)
