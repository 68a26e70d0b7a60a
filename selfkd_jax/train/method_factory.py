"""From `config.method` to a `Method`: the one place that maps method names to constructors."""

from __future__ import annotations

import jax.numpy as jnp

from selfkd_jax import methods

STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _cross_entropy(cfg, num_examples, num_classes, num_epochs):
  del cfg, num_examples, num_classes, num_epochs
  return methods.cross_entropy()


def _label_smoothing(cfg, num_examples, num_classes, num_epochs):
  del num_examples, num_classes, num_epochs
  return methods.label_smoothing(cfg.epsilon, exclude_target=cfg.exclude_target)


def _pskd(cfg, num_examples, num_classes, num_epochs):
  return methods.pskd(num_examples, num_classes, num_epochs, alpha_T=cfg.alpha_T,
                      refresh=cfg.refresh, storage_dtype=STORAGE_DTYPES[cfg.storage_dtype])


# name -> (constructor, the method's own config keys beyond `name`).
METHOD_BUILDERS = {
    "ce": (_cross_entropy, ()),
    "ls": (_label_smoothing, ("epsilon", "exclude_target")),
    "pskd": (_pskd, ("alpha_T", "refresh", "storage_dtype")),
}
METHOD_NAMES = tuple(METHOD_BUILDERS)


def build_method(method_config, *, num_examples: int, num_classes: int,
                 num_epochs: int) -> methods.Method:
  builder, _ = METHOD_BUILDERS[method_config.name]
  return builder(method_config, num_examples, num_classes, num_epochs)
