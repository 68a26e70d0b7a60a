"""Stateful self-distillation transforms: `init/update` pairs over explicit state pytrees.

See `base` for the contract. Nothing here imports the trainer, the data pipeline or a model.
"""
from selfkd_jax.methods.base import EmptyState, Method, MethodHooks, stateless_init
from selfkd_jax.methods.baselines import cross_entropy, label_smoothing
from selfkd_jax.methods.byot import byot
from selfkd_jax.methods.combine import combine
from selfkd_jax.methods.cskd import cskd
from selfkd_jax.methods.aekt import aekt
from selfkd_jax.methods.dkd import dkd
from selfkd_jax.methods.kd import kd, label_teacher, network_teacher, tfkd_self
from selfkd_jax.methods.lsskd import LSSKDState, lsskd, rotate_batch
from selfkd_jax.methods.mrkd import MrKDState, mrkd
from selfkd_jax.methods.per_example import (PerExampleTable, create_table, gather_rows,
                                            pad_tables, partition_specs, scatter_rows,
                                            set_index_checks, table_bytes)
from selfkd_jax.methods.pskd import PSKDState, pskd
from selfkd_jax.methods.ras_kd import RASKDState, ras_kd
from selfkd_jax.methods.reffakd import reffakd, soft_label_teacher
from selfkd_jax.methods.sharding import (from_pmap_layout, init_sharded, shard_state,
                                         state_shardings, to_pmap_layout)
from selfkd_jax.methods.virtual_teacher import lsrkd, tfkd_reg
from selfkd_jax.methods.zipf import zipf

__all__ = [
    "aekt", "byot", "combine", "create_table", "cross_entropy", "cskd", "dkd", "EmptyState",
    "from_pmap_layout", "gather_rows", "init_sharded", "kd", "label_smoothing", "label_teacher",
    "lsrkd", "lsskd", "LSSKDState", "Method", "MethodHooks", "mrkd", "MrKDState", "network_teacher",
    "pad_tables", "partition_specs", "PerExampleTable", "pskd", "PSKDState", "ras_kd", "RASKDState",
    "reffakd", "rotate_batch", "scatter_rows", "set_index_checks", "shard_state",
    "soft_label_teacher", "state_shardings", "stateless_init", "table_bytes", "tfkd_reg",
    "tfkd_self", "to_pmap_layout", "zipf",
]
