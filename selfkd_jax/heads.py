"""Heads: the parameters a method trains, as Flax modules attached to the user's model.

Four methods train parameters besides the model's: RAS-KD an auxiliary classifier, AEKT a
task-serialization head, BYOT and LSSKD exits on every stage. They are ordinary Flax modules
here. `with_heads(backbone, *heads)` runs the backbone, then each head on the outputs so far,
and returns the backbone's outputs plus what the heads add; the method's loss reads those keys.
One `jax.value_and_grad` over the wrapped model's parameters and the user's one optimizer train
backbone and heads together (`optax.multi_transform` on the top-level keys `'backbone'` and
`'heads_<i>'` if a head needs its own rate). Evaluation and export use the backbone alone:
`backbone_variables(variables)` is exactly the backbone's variables.

    backbone = models.get_model('resnet18', num_classes=100)
    model = heads.with_heads(backbone, heads.ExitHead(models.exits.make_exits(
        'byot', models.exits.stage_feature_shapes(backbone, (32, 32, 3)), 512, 100)))
    variables = model.init(key, images, train=False)     # {'params': {'backbone', 'heads_0'}}
    outputs = model.apply(variables, images, train=True, mutable=['batch_stats'])[0]
    loss, method_state, _ = methods.byot().update(method_state, outputs, batch, step=step)

| head              | adds to the outputs                                  | method         |
|-------------------|------------------------------------------------------|----------------|
| `AuxClassifier`   | `aux_logits` [B, C] (on stop-gradient features),     | `ras_kd`       |
|                   | `aux_kernel` [d, C]                                  |                |
| `SerializationHead` | `serialized_logits` [B, C]                         | `aekt`         |
| `ExitHead`        | `exit_logits`, `exit_features` (tuples, shallowest   | `byot`, `lsskd`|
|                   | first), `exit_class_logits` ({name: [B, C]})         |                |

Heads receive the wrapper's `train` flag (BatchNorm in the exits); a backbone whose `__call__`
has no `train` argument (called without one) runs its heads in eval mode. A head may not
overwrite a key the backbone or an earlier head produced.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from selfkd_jax.models import exits as exits_lib
from selfkd_jax.models.registry import abstract_model

BACKBONE = "backbone"
_HIGHEST = lax.Precision.HIGHEST


def _require(outputs: Mapping[str, Any], key: str, head: str) -> jax.Array:
  if key not in outputs:
    raise ValueError(f"{head}: the backbone's outputs have no {key!r} (keys: "
                     f"{', '.join(sorted(outputs))}); it needs a model that returns it")
  return outputs[key]


class AuxClassifier(nn.Module):
  """RAS-KD's light auxiliary classifier `g(f) = f W + b` on stop-gradient features.

  Its cross-entropy is part of `ras_kd`'s loss; reading `sg(outputs[input_key])` means the
  backbone gets no gradient from it. Initialised like `nn.Dense` (LeCun normal, zero bias).
  Adds `aux_logits` [B, C] and `aux_kernel` [d, C] (the weights whose rows are RAS-KD's class
  vectors in `prototypes='aux_weights'` mode).
  """
  num_classes: int
  input_key: str = "features"

  @nn.compact
  def __call__(self, outputs, *, train: bool = False):
    del train
    features = lax.stop_gradient(_require(outputs, self.input_key, "AuxClassifier"))
    dense = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                     precision=_HIGHEST, name="classifier")
    logits = dense(features.astype(jnp.float32))
    return {"aux_logits": logits, "aux_kernel": dense.variables["params"]["kernel"]}


def _identity_kernel(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


class SerializationHead(nn.Module):
  """AEKT's task-serialization head `h(z) = z W + b` on the logits, from the identity.

  Identity-initialised, so it starts as a no-op. Adds `serialized_logits` [B, C]; the model's
  own `logits` (what evaluation uses) are untouched.
  """
  num_classes: int

  @nn.compact
  def __call__(self, outputs, *, train: bool = False):
    del train
    logits = _require(outputs, "logits", "SerializationHead").astype(jnp.float32)
    if logits.shape[-1] != self.num_classes:
      raise ValueError(f"SerializationHead: logits have {logits.shape[-1]} classes, the head "
                       f"was built for {self.num_classes}")
    dense = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                     precision=_HIGHEST, kernel_init=_identity_kernel, name="serialization")
    return {"serialized_logits": dense(logits)}


class ExitHead(nn.Module):
  """Auxiliary exits (`models.exits.make_exits`) on the backbone's `stage_features`.

  Adds `exit_logits` and `exit_features` (tuples, one `[B, K]` / `[B, d]` array per exit,
  shallowest first: the exits' raw logits and adapted features, what `byot` and `lsskd` read)
  and `exit_class_logits` (`{'exit1': [B, C], ...}`, what evaluation reports: the logits
  themselves for 'byot' exits, the rotation-0 columns `4·y + 0` of 'hsakd' exits).

  `bn_axis_name`: the mesh axis over which the exits' BatchNorm averages batch statistics in
  train mode (the backbone's `bn_axis_name`), None on one device.
  """
  exits: exits_lib.Exits
  bn_axis_name: str | None = None

  def __call__(self, outputs, *, train: bool = False):
    stage_features = tuple(_require(outputs, "stage_features", "ExitHead"))
    logits, features = self.exits(stage_features, train=train, axis_name=self.bn_axis_name)
    # 'hsakd' exits predict joint (class, rotation) labels 4·y + k; rotation 0 is the class.
    class_logits = tuple(z[:, 0::self.exits.rotations] for z in logits)
    return {"exit_logits": logits, "exit_features": features,
            "exit_class_logits": dict(zip(self.exits.names, class_logits))}


class WithHeads(nn.Module):
  """A backbone and heads, run in sequence on one input; see the module docstring."""
  backbone: nn.Module
  heads: tuple[nn.Module, ...] = ()

  def __call__(self, x, *args, **kwargs):
    if args:  # a positional train flag would leave the heads in eval mode without a word
      raise ValueError("with_heads: pass the backbone's arguments by keyword (e.g. train=True) "
                       "so that the heads see the train flag")
    outputs = self.backbone(x, **kwargs)
    if not isinstance(outputs, Mapping):
      outputs = {"logits": outputs}
    outputs = dict(outputs)
    train = bool(kwargs.get("train", False))
    for head in self.heads:
      added = head(outputs, train=train)
      clash = sorted(set(added) & set(outputs))
      if clash:
        raise ValueError(f"with_heads: head {type(head).__name__} would overwrite "
                         f"{', '.join(clash)}, already in the outputs")
      outputs.update(added)
    return outputs


def with_heads(backbone: nn.Module, *heads: nn.Module) -> nn.Module:
  """`backbone` with `heads` attached (`backbone` itself when there are none)."""
  if not heads:
    return backbone
  return WithHeads(backbone=backbone, heads=tuple(heads))


def backbone_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone's variables of a `with_heads` model: every collection's `'backbone'` entry.

  What evaluation and export need: `backbone.apply(backbone_variables(v), x)` gives the same
  outputs as the wrapped model without the heads' keys, and the parameter count is exactly the
  backbone's.
  """
  if BACKBONE not in variables.get("params", {}):
    raise ValueError("backbone_variables: these are not the variables of a with_heads model "
                     f"(no 'params'/{BACKBONE!r}; top-level keys: "
                     f"{', '.join(sorted(variables.get('params', {})))})")
  return {name: collection[BACKBONE] for name, collection in variables.items()
          if BACKBONE in collection}


def parameter_count(params: Any) -> int:
  """The number of scalars in a parameter pytree."""
  return int(sum(leaf.size for leaf in jax.tree.leaves(params)))


def exit_head_for(kind: str, backbone: nn.Module, image_shape: Sequence[int], num_classes: int,
                  *, bn_axis_name: str | None = None, **make_exits_kwargs: Any) -> ExitHead:
  """An `ExitHead` of `make_exits(kind, ...)` shaped for `backbone` (one abstract trace)."""
  _, outputs = abstract_model(backbone, image_shape)
  if "stage_features" not in outputs or "features" not in outputs:
    raise ValueError("exit_head_for: the backbone must return 'stage_features' and 'features'")
  exits = exits_lib.make_exits(kind, outputs["stage_features"], outputs["features"].shape[-1],
                               num_classes, **make_exits_kwargs)
  return ExitHead(exits, bn_axis_name=bn_axis_name)

