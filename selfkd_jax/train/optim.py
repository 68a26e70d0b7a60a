"""Optimizers and learning-rate schedules from the config, with epoch-based milestones."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "multistep", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")


def learning_rate_schedule(opt_config, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
  """The schedule of `opt_config` with milestones given in epochs, converted to steps.

  `warmup_epochs > 0` prepends a step-wise linear warm-up over its W steps: step s (0-based)
  trains at `learning_rate * (s + 1) / W`, as Tf-KD's `WarmUpLR` (stepped before each update).
  'multistep' multiplies the rate by `decay_factor` at each epoch in `milestones` (PS-KD: 0.1 at
  150 and 225 of 300). 'cosine' decays to 0 over the epochs after the warm-up.
  """
  base = opt_config.learning_rate
  warmup_steps = int(opt_config.warmup_epochs * steps_per_epoch)
  total_steps = num_epochs * steps_per_epoch
  name = opt_config.schedule
  if name == "constant":
    main = optax.constant_schedule(base)
  elif name == "multistep":
    boundaries = {int(m * steps_per_epoch) - warmup_steps: opt_config.decay_factor
                  for m in opt_config.milestones}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(base, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(base / warmup_steps, base, warmup_steps - 1)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(opt_config, steps_per_epoch: int, num_epochs: int):
  """The optax transform of `opt_config` and its learning-rate schedule.

  SGD's `weight_decay` is PyTorch's: `wd * param` added to the gradient of every parameter
  (BatchNorm scales and biases included) before momentum, as in the official PS-KD, Tf-KD and
  CS-KD recipes. AdamW's is decoupled.
  """
  schedule = learning_rate_schedule(opt_config, steps_per_epoch, num_epochs)
  name = opt_config.name
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay),
        optax.sgd(schedule, momentum=opt_config.momentum or None,
                  nesterov=opt_config.nesterov))
  elif name == "adam":
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay), optax.adam(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt_config.weight_decay)
  else:
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
  return tx, schedule
