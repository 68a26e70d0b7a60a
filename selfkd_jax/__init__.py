"""selfkd_jax: teacher-free and self knowledge distillation for JAX.

`selfkd_jax.losses` holds pure per-example loss primitives, `selfkd_jax.methods` the stateful
init/update transforms; neither imports the trainer, the data pipeline or a model.
"""
__version__ = "0.1.0"
