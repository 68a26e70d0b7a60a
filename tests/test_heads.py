"""Heads attached to a model with `heads.with_heads`: structure, backbone-only export, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfkd_jax import heads, models

IMAGE_SHAPE = (28, 28, 1)


def _images(n=6, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, *IMAGE_SHAPE))


def _all_heads(backbone, num_classes=10):
  return (heads.AuxClassifier(num_classes), heads.SerializationHead(num_classes),
          heads.exit_head_for("byot", backbone, IMAGE_SHAPE, num_classes))


def test_backbone_alone_is_exactly_the_backbone():
  backbone = models.get_model("lenet5_bn", num_classes=10)
  model = heads.with_heads(backbone, *_all_heads(backbone))
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert set(variables["params"]) == {"backbone", "heads_0", "heads_1", "heads_2"}
  own = backbone.init(jax.random.PRNGKey(0), x, train=False)
  exported = heads.backbone_variables(variables)
  # Exactly the backbone's tree and parameter count (LeNet-5-BN: 61,728).
  assert jax.tree.structure(exported) == jax.tree.structure(own)
  assert heads.parameter_count(exported["params"]) == heads.parameter_count(own["params"])
  assert heads.parameter_count(own["params"]) == 61_728
  assert heads.parameter_count(variables["params"]) > 61_728
  wrapped = model.apply(variables, x, train=False)
  alone = backbone.apply(exported, x, train=False)
  np.testing.assert_array_equal(wrapped["logits"], alone["logits"])
  assert {"aux_logits", "aux_kernel", "serialized_logits", "exit_logits", "exit_features",
          "exit_class_logits"} <= set(wrapped) and "aux_logits" not in alone


def test_heads_see_the_train_flag_and_update_their_batch_stats():
  backbone = models.get_model("lenet5_bn", num_classes=10)
  model = heads.with_heads(backbone, heads.exit_head_for("byot", backbone, IMAGE_SHAPE, 10))
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["heads_0"]
  after = updates["batch_stats"]["heads_0"]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))  # every exit BatchNorm moved in train mode


def test_aux_classifier_sends_no_gradient_to_the_backbone():
  backbone = models.get_model("mlp", num_classes=10)
  model = heads.with_heads(backbone, heads.AuxClassifier(10))
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)

  def aux_only(params):
    outputs = model.apply({**variables, "params": params}, x, train=False)
    return jnp.sum(outputs["aux_logits"] ** 2)

  grads = jax.grad(aux_only)(variables["params"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
  assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(grads["heads_0"]))
  outputs = model.apply(variables, x, train=False)
  kernel = variables["params"]["heads_0"]["classifier"]["kernel"]
  np.testing.assert_array_equal(outputs["aux_kernel"], kernel)
  expected = (np.asarray(outputs["features"], np.float64) @ np.asarray(kernel, np.float64)
              + np.asarray(variables["params"]["heads_0"]["classifier"]["bias"]))
  np.testing.assert_allclose(outputs["aux_logits"], expected, rtol=1e-5, atol=1e-6)


def test_serialization_head_starts_as_the_identity():
  backbone = models.get_model("mlp", num_classes=10)
  model = heads.with_heads(backbone, heads.SerializationHead(10))
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  outputs = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(outputs["serialized_logits"], outputs["logits"])
  with pytest.raises(ValueError, match="built for 7"):
    heads.with_heads(backbone, heads.SerializationHead(7)).init(jax.random.PRNGKey(0), x,
                                                                 train=False)


def test_hsakd_exit_class_logits_are_the_rotation_zero_columns():
  backbone = models.get_model("lenet5_bn", num_classes=10)
  head = heads.exit_head_for("hsakd", backbone, IMAGE_SHAPE, 10)
  model = heads.with_heads(backbone, head)
  x = _images()
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  outputs = model.apply(variables, x, train=False)
  assert len(outputs["exit_logits"]) == head.exits.num_exits == 2
  for name, joint in zip(head.exits.names, outputs["exit_logits"]):
    assert joint.shape == (6, 40)
    np.testing.assert_array_equal(outputs["exit_class_logits"][name], joint[:, 0::4])


def test_no_heads_is_the_backbone_and_clashes_are_refused():
  backbone = models.get_model("mlp", num_classes=10)
  assert heads.with_heads(backbone) is backbone

  class Clash(nn.Module):
    @nn.compact
    def __call__(self, outputs, *, train=False):
      return {"logits": outputs["logits"] * 2}

  with pytest.raises(ValueError, match="would overwrite logits"):
    heads.with_heads(backbone, Clash()).init(jax.random.PRNGKey(0), _images(), train=False)
  variables = backbone.init(jax.random.PRNGKey(0), _images(), train=False)
  with pytest.raises(ValueError, match="not the variables of a with_heads model"):
    heads.backbone_variables(variables)


def test_a_head_reading_a_missing_output_names_it():
  class LogitsOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(x.reshape(x.shape[0], -1))  # a bare array: wrapped as 'logits'

  model = heads.with_heads(LogitsOnly(), heads.AuxClassifier(10))
  with pytest.raises(ValueError, match="AuxClassifier: the backbone's outputs have no "
                                       "'features'"):
    model.init(jax.random.PRNGKey(0), _images())


def test_a_positional_train_flag_is_refused():
  class Positional(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return {"logits": nn.Dense(10)(x.reshape(x.shape[0], -1)), "features": x[:, 0, 0]}

  model = heads.with_heads(Positional(), heads.AuxClassifier(10))
  with pytest.raises(ValueError, match="by keyword"):
    model.init(jax.random.PRNGKey(0), _images(), True)
