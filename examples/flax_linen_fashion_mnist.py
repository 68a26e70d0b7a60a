r"""Fashion-MNIST with Flax Linen: a plain CNN loop, plus one method of each self-KD family.

    PYTHONPATH=. python examples/flax_linen_fashion_mnist.py --method=pskd

The loop has the shape of the official Flax (Linen) MNIST example: a CNN, a `TrainState`,
`create_train_state`, a jitted `train_step`, `train_epoch` over a host-side permutation and
`train_and_evaluate`. Nothing from the selfkd_jax trainer, data pipeline or model zoo is used;
the data are the IDX files of Debian's `dataset-fashion-mnist`, read with numpy below.

`--method=ce` is the plain cross-entropy baseline. Each other method needs a few lines more;
every line added or changed for a family ends with its tag, so that
`grep -c '# \[targets\]$' <this file>` counts what PS-KD costs on top of the baseline:

  [targets]   PS-KD: the model's own past predictions, a table keyed by `batch['index']`.
  [snapshot]  MrKD: an earlier copy of the model's variables is the teacher.
  [partner]   CS-KD: a same-class partner image per example, run through the model.
  [head]      RAS-KD: an auxiliary classifier trained with the model, dropped at evaluation.
  [teacher]   KD: a frozen teacher network (here: the same CNN trained first with CE).
  [hooks]     the lines shared by [snapshot], [partner] and [teacher]: how a method may run
              the model (or the teacher) itself; methods that need nothing ignore them.
"""

import argparse
import functools
import logging
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfkd_jax import adapters  # [hooks]
from selfkd_jax import heads  # [head]
from selfkd_jax import methods
from selfkd_jax import partners as partners_lib  # [partner]

from fashion_mnist_data import DATA_DIR, load_fashion_mnist

NUM_CLASSES = 10
FEATURE_DIM = 128  # width of the CNN's penultimate layer, what RAS-KD's prototypes live in
METHODS = ("ce", "pskd", "mrkd", "cskd", "ras_kd", "kd")


class CNN(nn.Module):
  """The MNIST example's CNN, halved and with BatchNorm; returns `{'logits', 'features'}`.

  Half the example's widths, so that a few epochs take seconds on a CPU. A dict rather than
  bare logits because that is what the methods read (`outputs['logits']`), and RAS-KD's head
  also reads `outputs['features']`.
  """
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    for features in (16, 32):
      x = nn.Conv(features, kernel_size=(3, 3))(x)
      # Momentum 0.9, not 0.99: runs of a few dozen steps must still end with usable statistics.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape((x.shape[0], -1))))
    return {"logits": nn.Dense(self.num_classes)(x), "features": x}


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the BatchNorm statistics and the method's own state."""
  batch_stats: Any
  method_state: Any


def create_method(method_name: str, model: nn.Module, train_ds, *, num_epochs: int,
                  steps_per_epoch: int) -> methods.Method:
  """The loss transform; `methods.cross_entropy()` is the baseline."""
  if method_name == "pskd":  # [targets]
    return methods.pskd(len(train_ds["label"]), NUM_CLASSES, num_epochs,  # [targets]
                        steps_per_epoch=steps_per_epoch, alpha_T=0.8)  # [targets]
  if method_name == "mrkd":  # [snapshot]
    # The snapshot buffer needs the variables' shapes before any train state exists.
    template = adapters.linen_variables_template(  # [snapshot]
        model, train_ds["image"][:1], train=False)  # [snapshot]
    return methods.mrkd(template, refresh_every=steps_per_epoch)  # [snapshot]
  if method_name == "cskd":  # [partner]
    return methods.cskd()  # [partner]
  if method_name == "ras_kd":  # [head]
    return methods.ras_kd(NUM_CLASSES, FEATURE_DIM)  # [head]
  if method_name == "kd":  # [teacher]
    return methods.kd(methods.network_teacher(), alpha=0.9, temperature=4.0)  # [teacher]
  if method_name != "ce":
    raise ValueError(f"unknown method {method_name!r}; allowed: {', '.join(METHODS)}")
  return methods.cross_entropy()


def create_train_state(rng, model: nn.Module, method: methods.Method, learning_rate: float,
                       momentum: float) -> TrainState:
  """Initial parameters, BatchNorm statistics, SGD state and method state."""
  variables = model.init(rng, jnp.ones([1, 28, 28, 1]), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=optax.sgd(learning_rate, momentum),
                           batch_stats=variables["batch_stats"], method_state=method.init())


# `method` and the teacher's module are static values (hashable, not arrays): a new method or
# teacher compiles a new step, a new batch does not.
@functools.partial(jax.jit, static_argnames=("method", "teacher_model"))  # [teacher]
def train_step(state: TrainState, batch, method: methods.Method,
               teacher_model: nn.Module | None = None, teacher_variables=None):  # [teacher]
  """One SGD step on `method`'s loss; returns the new state and the step's metrics."""
  teacher = None  # [teacher]
  if teacher_model is not None:  # [teacher]
    teacher = adapters.as_teacher(teacher_model, teacher_variables)  # [teacher]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    outputs, updates = state.apply_fn(variables, batch["image"], train=True,
                                      mutable=["batch_stats"])
    # How a method may run the model again (a snapshot, the partners) or the teacher.
    hooks = adapters.linen_hooks(state.apply_fn, variables, batch["image"],  # [hooks]
                                 teacher=teacher)  # [teacher]
    # `state.step` is the 0-based optimizer step the method contract asks for (traced: no sync).
    per_example, method_state, metrics = method.update(
        state.method_state, outputs, batch, step=state.step,
        hooks=hooks)  # [hooks]
    return per_example.mean(), (outputs["logits"], updates["batch_stats"], method_state, metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, batch_stats, method_state, metrics)), grads = grad_fn(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats, method_state=method_state)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, dict(metrics, loss=loss, accuracy=accuracy)


def get_batch(train_ds, indices: np.ndarray,
              step: int = 0, partners=None) -> dict[str, np.ndarray]:  # [partner]
  """The training batch of the examples `indices` (at host-side optimizer step `step`)."""
  batch = {"image": train_ds["image"][indices], "label": train_ds["label"][indices]}
  batch["index"] = indices  # [targets]
  if partners is not None:  # [partner]
    # Drawn on the host from (seed, step, index), so they need no device round trip.
    batch["partner_image"] = train_ds["image"][partners.partners(indices, step)]  # [partner]
  return batch


def train_epoch(state: TrainState, train_ds, batch_size: int, rng, method: methods.Method,
                epoch: int = 0, partners=None,  # [partner]
                teacher=None):  # [teacher]
  """One pass over `rng.permutation(N)` in batches, the last partial batch dropped.

  Args:
    state: the train state.
    train_ds: the training split (`load_fashion_mnist`).
    batch_size: examples per step.
    rng: a `np.random.Generator`; the epoch's order is its next `permutation(N)`.
    method: the loss transform.
    epoch: 0-based epoch, which with the batch number gives the host-side step.
    partners: a `SameClassPartners` for CS-KD, else None.
    teacher: (Linen module, variables) of a frozen teacher for KD, else None.

  Returns:
    The new state and the epoch's per-step metrics, as numpy arrays.
  """
  teacher_model, teacher_variables = teacher or (None, None)  # [teacher]
  steps_per_epoch = len(train_ds["label"]) // batch_size
  perms = rng.permutation(len(train_ds["label"]))[:steps_per_epoch * batch_size]
  step_metrics = []
  for i, perm in enumerate(perms.reshape((steps_per_epoch, batch_size))):  # [partner]
    # The host counts steps itself: `int(state.step)` would wait for the device every step.
    step = epoch * steps_per_epoch + i  # [partner]
    batch = get_batch(train_ds, perm,
                      step, partners)  # [partner]
    state, metrics = train_step(state, batch, method,
                                teacher_model, teacher_variables)  # [teacher]
    step_metrics.append(metrics)
  step_metrics = jax.device_get(step_metrics)  # one transfer per epoch, not per step
  return state, {k: np.array([m[k] for m in step_metrics]) for k in step_metrics[0]}


@functools.partial(jax.jit, static_argnames="model")
def eval_step(model: nn.Module, variables, batch):
  """Summed cross-entropy and number correct of one test batch."""
  logits = model.apply(variables, batch["image"], train=False)["logits"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == batch["label"])


def evaluate(model: nn.Module, variables, test_ds, batch_size: int = 1000):
  """(mean loss, accuracy) over the test split."""
  sums = [eval_step(model, variables, {k: v[i:i + batch_size] for k, v in test_ds.items()})
          for i in range(0, len(test_ds["label"]), batch_size)]
  loss, correct = np.sum(jax.device_get(sums), axis=0)
  return float(loss) / len(test_ds["label"]), float(correct) / len(test_ds["label"])


def train_and_evaluate(method_name: str, train_ds, test_ds, *, num_epochs: int = 5,
                       batch_size: int = 128, learning_rate: float = 0.05,
                       momentum: float = 0.9, seed: int = 0,
                       teacher=None, teacher_epochs: int = 1):  # [teacher]
  """Trains the CNN with `method_name` and evaluates it after every epoch.

  Args:
    method_name: one of `METHODS`.
    train_ds: the training split (dict of numpy arrays).
    test_ds: the test split.
    num_epochs: epochs to train.
    batch_size: examples per step.
    learning_rate: SGD learning rate.
    momentum: SGD momentum.
    seed: initialisation seed; epoch orders are `np.random.default_rng(seed).permutation`s.
    teacher: for 'kd', `(module, variables)` of a trained teacher; None trains one first with
      'ce' for `teacher_epochs` epochs.
    teacher_epochs: see `teacher`.

  Returns:
    `(state, summary)`: the final train state and a dict with the per-step `train_loss`, the
    last epoch's per-step `metrics`, `test_loss`/`test_accuracy` of every epoch and
    `eval_param_count`, the number of parameters evaluated (RAS-KD: the backbone's alone).
  """
  steps_per_epoch = len(train_ds["label"]) // batch_size
  model = CNN()
  # RAS-KD's auxiliary classifier, trained by the same optimizer as the model.
  if method_name == "ras_kd":  # [head]
    model = heads.with_heads(model, heads.AuxClassifier(NUM_CLASSES))  # [head]
  method = create_method(method_name, model, train_ds, num_epochs=num_epochs,
                         steps_per_epoch=steps_per_epoch)
  state = create_train_state(jax.random.key(seed), model, method, learning_rate, momentum)
  partners = None  # [partner]
  if method_name == "cskd":  # [partner]
    partners = partners_lib.SameClassPartners(train_ds["label"], seed=seed)  # [partner]
  if method_name == "kd" and teacher is None:  # [teacher]
    teacher_state, _ = train_and_evaluate(  # [teacher]
        "ce", train_ds, test_ds, num_epochs=teacher_epochs, seed=seed + 1)  # [teacher]
    teacher = (CNN(), {"params": teacher_state.params,  # [teacher]
                       "batch_stats": teacher_state.batch_stats})  # [teacher]

  rng = np.random.default_rng(seed)
  summary = {"train_loss": [], "test_loss": [], "test_accuracy": []}
  for epoch in range(num_epochs):
    state, metrics = train_epoch(state, train_ds, batch_size, rng, method,
                                 epoch, partners,  # [partner]
                                 teacher)  # [teacher]
    eval_model, eval_variables = model, {"params": state.params,
                                         "batch_stats": state.batch_stats}
    # Evaluate (and export) the backbone alone, without RAS-KD's head.
    if method_name == "ras_kd":  # [head]
      eval_model, eval_variables = model.backbone, heads.backbone_variables(  # [head]
          eval_variables)  # [head]
    test_loss, test_accuracy = evaluate(eval_model, eval_variables, test_ds)
    summary["train_loss"].extend(metrics["loss"])
    summary["test_loss"].append(test_loss)
    summary["test_accuracy"].append(test_accuracy)
    logging.info("%s epoch %d: train loss %.4f accuracy %.4f, test loss %.4f accuracy %.4f",
                 method_name, epoch + 1, metrics["loss"].mean(), metrics["accuracy"].mean(),
                 test_loss, test_accuracy)
  num_params = sum(x.size for x in jax.tree.leaves(eval_variables["params"]))
  summary.update(metrics=metrics, train_loss=np.array(summary["train_loss"]),
                 eval_param_count=num_params)
  return state, summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", choices=METHODS, default="ce")
  parser.add_argument("--num_epochs", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=0.05)
  parser.add_argument("--limit_train", type=int, default=0, help="first N examples; 0: all")
  parser.add_argument("--data_dir", default=DATA_DIR)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  train_ds, test_ds = load_fashion_mnist(args.data_dir, args.limit_train)
  _, summary = train_and_evaluate(args.method, train_ds, test_ds, num_epochs=args.num_epochs,
                                  batch_size=args.batch_size, learning_rate=args.learning_rate)
  print(f"{args.method}: test accuracy {summary['test_accuracy'][-1]:.4f}")


if __name__ == "__main__":
  main()
