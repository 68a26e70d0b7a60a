"""From `config.method` to a `Method`: the one place that maps method names to constructors.

Each builder gets the method's own config and a `MethodContext`: what the run knows that a
method may need (dataset size, classes, epochs, the model's feature width). Method modules never
see the config. `build_heads` gives the heads a method trains (attached to the model with
`heads.with_heads`) and `model_inputs` what the model runs on instead of the batch's images
(LSSKD's rotations).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from selfkd_jax import heads as heads_lib
from selfkd_jax import methods, models
from selfkd_jax.models import exits as exits_lib

STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What a method builder may use besides its own config.

  Attributes:
    num_examples: training examples (the per-example tables' rows).
    num_classes: classes of the dataset.
    num_epochs: the run's epochs (schedules such as PS-KD's alpha).
    steps_per_epoch: optimizer steps per epoch.
    output_shapes: shapes of the model's outputs by key (e.g. `{'features': (1, 84)}`), so a
      builder can refuse a model that lacks what its method reads.
    dataset: dataset name; data_dir: its folder ('' = default); seed: the run's seed.
    log: where a builder reports long one-off work (e.g. making an artifact).
    soft_labels: a stand-in `[C, C]` soft-label matrix for ReffAKD (benchmarks time the loss
      without making an artifact); None = load or make the artifact named by the config.
    variable_shapes: the model's `{'params', 'batch_stats'}` as ShapeDtypeStructs, for methods
      that keep copies of them (MrKD's snapshots).
    stage_shapes: shapes of `outputs['stage_features']` (one image), for methods that put
      auxiliary exits on the stages (BYOT, LSSKD).
    model: the (eval-mode) model, for exits that copy its blocks (LSSKD's HSAKD heads).
  """
  num_examples: int
  num_classes: int
  num_epochs: int
  steps_per_epoch: int = 1
  output_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  dataset: str = ""
  data_dir: str = ""
  seed: int = 0
  log: Callable[[str], Any] = print
  soft_labels: Any = None
  variable_shapes: Any = None
  stage_shapes: tuple = ()
  model: Any = None


def model_fields(model, image_shape) -> dict[str, Any]:
  """The `MethodContext` fields that describe `model` (its eval-mode module), from one abstract
  trace: `MethodContext(..., **model_fields(eval_model, image_shape))`."""
  variables, outputs = models.abstract_model(model, image_shape)
  return {"output_shapes": models.array_shapes(outputs), "variable_shapes": variables,
          "stage_shapes": tuple(outputs.get("stage_features", ())), "model": model}


def _cross_entropy(cfg, ctx):
  del cfg, ctx
  return methods.cross_entropy()


def _label_smoothing(cfg, ctx):
  del ctx
  return methods.label_smoothing(cfg.epsilon, exclude_target=cfg.exclude_target)


def _pskd(cfg, ctx):
  return methods.pskd(ctx.num_examples, ctx.num_classes, ctx.num_epochs,
                      steps_per_epoch=ctx.steps_per_epoch, alpha_T=cfg.alpha_T,
                      refresh=cfg.refresh, storage_dtype=STORAGE_DTYPES[cfg.storage_dtype])


def _tfkd_reg(cfg, ctx):
  del ctx
  return methods.tfkd_reg(alpha=cfg.alpha, temperature=cfg.temperature,
                          correct_prob=cfg.correct_prob, multiplier=cfg.multiplier,
                          variant=cfg.variant)


def _lsrkd(cfg, ctx):
  del ctx
  return methods.lsrkd(alpha=cfg.alpha, temperature=cfg.temperature)


def _lsrkd_tc(cfg, ctx):
  del ctx
  return methods.lsrkd(alpha=cfg.alpha, temperature=cfg.temperature, beta=cfg.beta)


def _zipf(cfg, ctx):
  if cfg.dense and ctx.output_shapes and "dense_logits" not in ctx.output_shapes:
    raise ValueError("dense=True needs a model with dense per-position logits "
                     "(outputs['dense_logits']); this model has none (e.g. lenet5_bn): set "
                     "config.method.dense=False")
  return methods.zipf(weight=cfg.weight, dense=cfg.dense, upsample=cfg.upsample)


def _ras_kd(cfg, ctx):
  return methods.ras_kd(
      ctx.num_classes, ctx.output_shapes["features"][-1], epsilon=cfg.epsilon,
      relation_temperature=cfg.relation_temperature, momentum=cfg.momentum,
      prototypes=cfg.prototypes, instance_weight=cfg.instance_weight,
      temperature=cfg.temperature)


def _reffakd_soft_labels(cfg, ctx):
  """The run's ReffAKD soft labels: the artifact named by the config, made if missing."""
  if ctx.soft_labels is not None:
    return np.asarray(ctx.soft_labels)
  from selfkd_jax import reffakd  # pylint: disable=g-import-not-at-top  (trainer-only deps)
  path = cfg.artifact or os.path.join("artifacts", f"reffakd_{ctx.dataset}.json")
  artifact = reffakd.ensure_artifact(
      path, dataset=ctx.dataset, num_classes=ctx.num_classes, data_dir=ctx.data_dir or None,
      seed=cfg.artifact_seed, epochs=cfg.autoencoder_epochs or None, log=ctx.log,
      progress=sys.stderr.isatty())  # a bar only on a terminal, not in log files
  return np.asarray(artifact.soft_labels(cfg.soft_label_temperature))


def _reffakd(cfg, ctx):
  return methods.reffakd(_reffakd_soft_labels(cfg, ctx), alpha=cfg.alpha,
                         temperature=cfg.temperature, variant=cfg.variant)


TEACHERS = ("checkpoint", "reffakd")


def _teacher(cfg, ctx):
  """The teacher a KD-family method distils from, by `cfg.teacher`.

  'checkpoint': the frozen network of `config.teacher` (the trainer supplies it through
  `hooks.teacher`); 'reffakd': the ReffAKD soft labels as a label-only pseudo-teacher with
  logits `log S_soft[y]`.
  """
  if cfg.teacher == "checkpoint":
    return methods.network_teacher()
  if cfg.teacher == "reffakd":
    soft_labels = _reffakd_soft_labels(cfg, ctx)
    return methods.label_teacher(methods.soft_label_teacher(soft_labels, as_logits=True))
  raise ValueError(f"teacher={cfg.teacher!r}; allowed: {', '.join(TEACHERS)}")


def _kd(cfg, ctx):
  return methods.kd(_teacher(cfg, ctx), alpha=cfg.alpha, temperature=cfg.temperature)


def _dkd(cfg, ctx):
  return methods.dkd(_teacher(cfg, ctx), steps_per_epoch=ctx.steps_per_epoch,
                     alpha=cfg.alpha, beta=cfg.beta,
                     temperature=cfg.temperature, warmup_epochs=cfg.warmup_epochs,
                     ce_weight=cfg.ce_weight)


def _aekt(cfg, ctx):
  return methods.aekt(_teacher(cfg, ctx), steps_per_epoch=ctx.steps_per_epoch,
                      alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature,
                      warmup_epochs=cfg.warmup_epochs, weight_fn=cfg.weight_fn, max_weight=cfg.max_weight,
                      serialization_head=cfg.serialization_head)


def _mrkd(cfg, ctx):
  if ctx.variable_shapes is None:
    raise ValueError("mrkd needs the model's variable shapes (MethodContext.variable_shapes)")
  tc = cfg.get("tc", None)
  return methods.mrkd(ctx.variable_shapes, refresh_every=cfg.refresh_every or ctx.steps_per_epoch,
                      alpha=cfg.alpha, temperature=cfg.temperature,
                      num_snapshots=cfg.num_snapshots, tc=tc or None,
                      tc_beta=cfg.get("tc_beta", 0.5), tc_when=cfg.get("tc_when", "always"))


def _byot(cfg, ctx):
  return methods.byot(alpha=cfg.alpha, temperature=cfg.temperature,
                      feature_weight=cfg.feature_weight, variant=cfg.variant,
                      feature_norm=cfg.feature_norm,
                      feature_exits=tuple(cfg.feature_exits) or None)


def _exits_init(ctx) -> str:
  """Exits start like their backbone (`config.model.init`): the official codes that train them
  initialise the whole network with one scheme."""
  return getattr(ctx.model, "init_scheme", "flax") if ctx.model is not None else "flax"


def _byot_exits(cfg, ctx):
  if len(ctx.stage_shapes) < 2:
    raise ValueError("byot needs a model with at least 2 stages in outputs['stage_features']")
  return exits_lib.make_exits("byot", ctx.stage_shapes, ctx.output_shapes["features"][-1],
                              ctx.num_classes, attention=cfg.attention, init=_exits_init(ctx))


def _lsskd_exits(cfg, ctx):
  del cfg
  kwargs = exits_lib.backbone_exit_kwargs(ctx.model) if ctx.model is not None else {}
  return exits_lib.make_exits("hsakd", ctx.stage_shapes, ctx.output_shapes["features"][-1],
                              ctx.num_classes, init=_exits_init(ctx), **kwargs)


def _lsskd(cfg, ctx):
  return methods.lsskd(ctx.num_examples, ctx.num_classes, ctx.num_epochs,
                       num_heads=_lsskd_exits(cfg, ctx).num_exits,
                       steps_per_epoch=ctx.steps_per_epoch, alpha_T=cfg.alpha_T,
                       aux_alpha_T=cfg.aux_alpha_T or None,
                       temperature=cfg.temperature, aux_weight=cfg.aux_weight,
                       distill_weight=cfg.distill_weight, feature_weight=cfg.feature_weight,
                       main_pskd=cfg.main_pskd, storage_dtype=STORAGE_DTYPES[cfg.storage_dtype])


def _cskd(cfg, ctx):
  del ctx
  return methods.cskd(temperature=cfg.temperature, weight=cfg.weight)


def _tfkd_self(cfg, ctx):
  del ctx
  return methods.tfkd_self(methods.network_teacher(), alpha=cfg.alpha,
                           temperature=cfg.temperature, multiplier=cfg.multiplier,
                           variant=cfg.variant)


_ARTIFACT_KEYS = {"soft_label_temperature": 1.0, "artifact": "", "artifact_seed": 0,
                  "autoencoder_epochs": 0}


# name -> (builder, the method's own config keys beyond `name`, with their defaults).
METHOD_BUILDERS: dict[str, tuple[Callable, dict[str, Any]]] = {
    "ce": (_cross_entropy, {}),
    "ls": (_label_smoothing, {"epsilon": 0.1, "exclude_target": False}),
    "pskd": (_pskd, {"alpha_T": 0.8, "refresh": "step", "storage_dtype": "float32"}),
    "tfkd_reg": (_tfkd_reg, {"alpha": 0.1, "temperature": 20.0, "correct_prob": 0.99,
                             "multiplier": 100.0, "variant": "faithful"}),
    "lsrkd": (_lsrkd, {"alpha": 0.1, "temperature": 2.0}),
    "lsrkd_tc": (_lsrkd_tc, {"alpha": 0.1, "temperature": 2.0, "beta": 0.5}),
    "zipf": (_zipf, {"weight": 0.1, "dense": True, "upsample": 2}),
    "ras_kd": (_ras_kd, {"epsilon": 0.1, "relation_temperature": 0.1, "momentum": 0.9,
                         "prototypes": "ema", "instance_weight": 0.0, "temperature": 4.0}),
    # artifact '' = artifacts/reffakd_<dataset>.json, made on first use (autoencoder_epochs
    # epochs; 0 = the notebooks' 200) and reused by every later run on that dataset.
    "reffakd": (_reffakd, {"alpha": 0.5, "temperature": 1.0, "variant": "faithful",
                           **_ARTIFACT_KEYS}),
    # KD-family teachers: 'checkpoint' = the network of config.teacher, 'reffakd' = the ReffAKD
    # soft labels (the artifact keys then apply).
    "kd": (_kd, {"alpha": 0.9, "temperature": 4.0, "teacher": "checkpoint", **_ARTIFACT_KEYS}),
    "dkd": (_dkd, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0,
                   "ce_weight": 1.0, "teacher": "checkpoint", **_ARTIFACT_KEYS}),
    "aekt": (_aekt, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0,
                     "weight_fn": "ratio", "max_weight": 1.0, "serialization_head": True,
                     "teacher": "checkpoint", **_ARTIFACT_KEYS}),
    "tfkd_self": (_tfkd_self, {"alpha": 0.95, "temperature": 6.0, "multiplier": 50.0,
                               "variant": "faithful"}),
    # refresh_every 0 = once per epoch; the snapshots are the model's own earlier weights.
    "mrkd": (_mrkd, {"alpha": 0.5, "temperature": 4.0, "refresh_every": 0, "num_snapshots": 1}),
    "mrkd_tc": (_mrkd, {"alpha": 0.5, "temperature": 4.0, "refresh_every": 0,
                        "num_snapshots": 1, "tc": "mix", "tc_beta": 0.5, "tc_when": "always"}),
    # Exits on every stage but the last, a head of the model; feature_exits ()
    # = every exit gets the feature term (the official code skips exit 3 of 4: (1, 2)).
    "byot": (_byot, {"alpha": 0.3, "temperature": 3.0, "feature_weight": 0.03,
                     "variant": "journal", "feature_norm": "batch", "feature_exits": (),
                     "attention": True}),
    # HSAKD rotation heads on every stage (4 rotations per image), PS-KD targets for the main
    # head and every auxiliary head; aux_alpha_T 0 = alpha_T.
    "lsskd": (_lsskd, {"alpha_T": 0.8, "aux_alpha_T": 0.0, "temperature": 3.0,
                       "aux_weight": 1.0, "distill_weight": 1.0, "feature_weight": 0.03,
                       "main_pskd": True, "storage_dtype": "float32"}),
    # Needs same-class partners from the data pipeline (see `needs_partners`).
    "cskd": (_cskd, {"temperature": 4.0, "weight": 1.0}),
}
METHOD_NAMES = tuple(METHOD_BUILDERS)


def needs_network_teacher(method_config) -> bool:
  """Whether the method distils from the frozen network of `config.teacher`."""
  if method_config.name == "tfkd_self":
    return True
  return method_config.get("teacher", None) == "checkpoint"


def needs_partners(method_config) -> bool:
  """Whether the method reads a same-class partner per example (`TrainBatches(partners=True)`)."""
  return method_config.name == "cskd"


def build_heads(method_config, context: MethodContext, *, bn_axis_name: str | None = None
                ) -> tuple[Any, ...]:
  """The heads the method trains, to attach with `heads.with_heads` (() for most methods)."""
  name = method_config.name
  if name == "ras_kd":
    return (heads_lib.AuxClassifier(context.num_classes),)
  if name == "aekt" and method_config.serialization_head:
    return (heads_lib.SerializationHead(context.num_classes),)
  if name == "byot":
    return (heads_lib.ExitHead(_byot_exits(method_config, context), bn_axis_name=bn_axis_name),)
  if name == "lsskd":
    return (heads_lib.ExitHead(_lsskd_exits(method_config, context), bn_axis_name=bn_axis_name),)
  return ()


def model_inputs(method_config) -> Callable[[Any], Any] | None:
  """What the model trains on instead of the batch's images (LSSKD: the four rotations)."""
  return methods.rotate_batch if method_config.name == "lsskd" else None


@dataclasses.dataclass(frozen=True)
class MethodSetup:
  """A run's method and the models it trains and evaluates.

  Attributes:
    method: the `Method`.
    model: the backbone with the method's heads, BatchNorm over `parallel.AXIS` (training).
    eval_model: the same on one device's batch (init, evaluation, refresh passes).
    model_inputs: what the model trains on instead of the images (LSSKD), or None.
  """
  method: methods.Method
  model: Any
  eval_model: Any
  model_inputs: Callable[[Any], Any] | None


def setup_method(method_config, context: MethodContext, backbone, eval_backbone, *,
                 bn_axis_name: str | None) -> MethodSetup:
  """The method of `method_config` and the backbones with its heads attached."""
  train_heads = build_heads(method_config, context, bn_axis_name=bn_axis_name)
  return MethodSetup(
      method=build_method(method_config, context),
      model=heads_lib.with_heads(backbone, *train_heads),
      eval_model=heads_lib.with_heads(eval_backbone, *build_heads(method_config, context)),
      model_inputs=model_inputs(method_config))


def method_defaults(name: str) -> dict[str, Any]:
  """The method's own config keys and their defaults."""
  return dict(METHOD_BUILDERS[name][1])


def build_method(method_config, context: MethodContext) -> methods.Method:
  """Builds the method; a value its constructor refuses raises a one-line ValueError."""
  builder, _ = METHOD_BUILDERS[method_config.name]
  return builder(method_config, context)
