"""Method-owned parameters differentiated by the caller (`Method.owned`, BYOT and LSSKD).

The trainer differentiates the loss with respect to the model and the method's exits together
and lets the method step them afterwards (`hooks.owned_differentiated`). That path must give the
loss, the backbone gradient and the new state of the method's own step, with one pass of the
exits instead of two. Synthetic outputs keep everything tiny.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax.methods import MethodHooks, byot, lsskd
from selfkd_jax.models.exits import make_exits

B, C, D, N = 8, 3, 6, 16
STAGES = ((8, 8, 4), (4, 4, 8))


class CountingExits:
  """The exits, counting how often a method applies them while tracing."""

  def __init__(self, exits):
    self._exits = exits
    self.applies = 0

  def __getattr__(self, name):
    return getattr(self._exits, name)

  def apply(self, *args, **kwargs):
    self.applies += 1
    return self._exits.apply(*args, **kwargs)


def _outputs(rows, key):
  keys = jax.random.split(key, 4)
  return {"logits": 2.0 * jax.random.normal(keys[0], (rows, C)),
          "features": jax.nn.relu(jax.random.normal(keys[1], (rows, D))),
          "stage_features": tuple(jax.nn.relu(jax.random.normal(k, (rows, *shape)))
                                  for k, shape in zip(keys[2:], STAGES))}


def _build(name):
  batch = {"label": jnp.arange(B) % C, "index": jnp.arange(B) * 2}
  if name == "byot":
    exits = CountingExits(make_exits("byot", STAGES, D, C))
    return exits, byot(exits, feature_norm="batch"), _outputs(B, jax.random.PRNGKey(0)), batch
  exits = CountingExits(make_exits("hsakd", STAGES, D, C))
  method = lsskd(exits, N, C, num_epochs=3, steps_per_epoch=1)
  return exits, method, _outputs(4 * B, jax.random.PRNGKey(0)), batch


def _own_step(method, state, outputs, batch, epoch):
  def mean_loss(outputs):
    loss, new_state, _ = method.update(state, outputs, batch, step=epoch)
    return jnp.mean(loss), new_state
  (loss, new_state), grads = jax.value_and_grad(mean_loss, has_aux=True)(outputs)
  return loss, grads, new_state


def _caller_step(method, state, outputs, batch, epoch):
  owned = method.owned

  def mean_loss(outputs, owned_params):
    loss, new_state, _ = method.update(owned.put(state, owned_params), outputs, batch,
                                       step=epoch,
                                       hooks=MethodHooks(owned_differentiated=True))
    return jnp.mean(loss), new_state
  (loss, new_state), (grads, owned_grads) = jax.value_and_grad(
      mean_loss, argnums=(0, 1), has_aux=True)(outputs, owned.get(state))
  return loss, grads, owned.apply_gradients(new_state, owned_grads)


@pytest.mark.parametrize("name", ["byot", "lsskd"])
def test_caller_differentiated_exits_match_the_methods_own_step(name):
  exits, method, outputs, batch = _build(name)
  state = method.init(jax.random.PRNGKey(1))
  own, caller = jax.jit(_own_step, static_argnums=0), jax.jit(_caller_step, static_argnums=0)
  for epoch in (0, 1):  # the second step starts from moved exits, momentum and tables
    exits.applies = 0
    loss_a, grads_a, state_a = own(method, state, outputs, batch, epoch)
    own_applies, exits.applies = exits.applies, 0
    loss_b, grads_b, state_b = caller(method, state, outputs, batch, epoch)
    assert (own_applies, exits.applies) == ((2, 1) if epoch == 0 else (0, 0))  # traced once
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: x - y, state_a.exit_params,
                                         state.exit_params))
    assert max(float(jnp.abs(m).max()) for m in moved) > 1e-4  # the exits did learn
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    state = state_a


def test_combine_forwards_exits_and_weights_their_gradient():
  from selfkd_jax.methods import combine, label_smoothing
  _, method, outputs, batch = _build("byot")
  combined = combine([1.0, 0.5], label_smoothing(0.1), method)
  state = combined.init(jax.random.PRNGKey(1))
  _, _, own = jax.jit(_own_step, static_argnums=0)(method, state[1], outputs, batch, 0)
  _, _, joint = jax.jit(_caller_step, static_argnums=0)(combined, state, outputs, batch, 0)
  # First sgd(0.1, momentum 0.9) step: the move is -0.1 × gradient, and the combined loss
  # carries BYOT at weight 0.5, so its exits move half as far as on BYOT's own loss.
  own_move = jax.tree.map(lambda a, b: a - b, own.exit_params, state[1].exit_params)
  joint_move = jax.tree.map(lambda a, b: a - b, joint[1].exit_params, state[1].exit_params)
  for a, b in zip(jax.tree.leaves(own_move), jax.tree.leaves(joint_move)):
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-4, atol=1e-7)
  logits = combined.exit_logits(joint, {"stage_features": outputs["stage_features"]})
  assert list(logits) == ["exit1"] and logits["exit1"].shape == (B, C)
  with pytest.raises(ValueError, match="train_inputs"):
    combine([1.0, 1.0], label_smoothing(0.1), _build("lsskd")[1])
