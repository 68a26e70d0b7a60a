"""selfkd_jax: teacher-free and self knowledge distillation for JAX.

What a user's own training loop needs, with the core install (jax, flax, optax, numpy):

- `selfkd_jax.losses`: pure per-example loss primitives.
- `selfkd_jax.methods`: the stateful `init/update` transforms (state is an explicit pytree in
  the caller's train state); neither imports the trainer, the data pipeline or a model.
- `selfkd_jax.heads`: the parameters a method trains (auxiliary classifiers, exits) as Flax
  modules attached to the caller's model with `heads.with_heads`.
- `selfkd_jax.adapters`: the forward passes and teachers a method needs, from a Flax Linen or
  NNX model.
- `selfkd_jax.partners`: same-class partner sampling for CS-KD (numpy).

The trainer (`selfkd_jax.train`, `launch.py`) and its data pipeline need the `train` extra.
"""
__version__ = "0.1.0"
