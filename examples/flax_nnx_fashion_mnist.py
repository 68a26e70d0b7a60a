r"""Fashion-MNIST with Flax NNX: a plain CNN loop, plus one method of each self-KD family.

    PYTHONPATH=. python examples/flax_nnx_fashion_mnist.py --method=pskd

The loop has the shape of the Flax NNX MNIST tutorial: an `nnx.Module` CNN, an
`nnx.Optimizer`, a `train_step` under `nnx.jit` with `nnx.value_and_grad`, `train_epoch` over a
host-side permutation and `train_and_evaluate`. Nothing from the selfkd_jax trainer, data
pipeline or model zoo is used; the data are the IDX files of Debian's `dataset-fashion-mnist`,
read with numpy below. `examples/flax_linen_fashion_mnist.py` is the same loop in Linen.

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

The method's state is a pytree passed into and returned from the jitted step, next to the
model and optimizer that NNX updates in place.
"""

import argparse
import functools
import logging

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfkd_jax import adapters  # [hooks]
from selfkd_jax import methods
from selfkd_jax import partners as partners_lib  # [partner]

from fashion_mnist_data import DATA_DIR, load_fashion_mnist

NUM_CLASSES = 10
FEATURE_DIM = 128  # width of the CNN's penultimate layer, what RAS-KD's prototypes live in
METHODS = ("ce", "pskd", "mrkd", "cskd", "ras_kd", "kd")


class CNN(nnx.Module):
  """The MNIST tutorial's CNN, halved and with BatchNorm; returns `{'logits', 'features'}`.

  Half the tutorial's widths, so that a few epochs take seconds on a CPU. A dict rather than
  bare logits because that is what the methods read (`outputs['logits']`), and RAS-KD's head
  also reads `outputs['features']`.
  """

  def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    # Momentum 0.9, not 0.99: runs of a few dozen steps must still end with usable statistics.
    self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.linear1 = nnx.Linear(7 * 7 * 32, FEATURE_DIM, rngs=rngs)
    self.linear2 = nnx.Linear(FEATURE_DIM, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
      x = nnx.avg_pool(nnx.relu(bn(conv(x))), window_shape=(2, 2), strides=(2, 2))
    features = nnx.relu(self.linear1(x.reshape((x.shape[0], -1))))
    return {"logits": self.linear2(features), "features": features}


# selfkd_jax.heads are Linen modules. A native nnx.Linear is simpler than wrapping
# heads.AuxClassifier with flax.nnx.bridge (no lazy init from a sample input, no Linen
# collections to map): `ras_kd` with its default 'ema' prototypes reads only `aux_logits`.
class WithAuxHead(nnx.Module):  # [head]
  """The backbone plus RAS-KD's auxiliary classifier `aux_logits`."""  # [head]

  def __init__(self, backbone: nnx.Module, *, rngs: nnx.Rngs):  # [head]
    self.backbone = backbone  # [head]
    self.aux = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)  # [head]

  def __call__(self, x):  # [head]
    outputs = dict(self.backbone(x))  # [head]
    # Stop-gradient: the head learns from the features without shaping them, which is what
    # ras_kd's loss assumes (its head term must send nothing to the backbone).
    outputs["aux_logits"] = self.aux(jax.lax.stop_gradient(outputs["features"]))  # [head]
    return outputs  # [head]


def create_method(method_name: str, model: nnx.Module, train_ds, *, num_epochs: int,
                  steps_per_epoch: int) -> methods.Method:
  """The loss transform; `methods.cross_entropy()` is the baseline."""
  if method_name == "pskd":  # [targets]
    return methods.pskd(len(train_ds["label"]), NUM_CLASSES, num_epochs,  # [targets]
                        steps_per_epoch=steps_per_epoch, alpha_T=0.8)  # [targets]
  if method_name == "mrkd":  # [snapshot]
    # The snapshot buffer needs the shapes of the model's weights and BatchNorm statistics.
    template = adapters.nnx_variables_template(model)  # [snapshot]
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


@functools.partial(nnx.jit, static_argnames="method")
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, method: methods.Method,
               method_state, batch, teacher: nnx.Module | None = None):  # [teacher]
  """One SGD step on `method`'s loss; updates `model` and `optimizer` in place.

  `method` is static: one compiled step per method (a `Method` is hashable).

  Returns:
    The new method state and the step's metrics.
  """
  # The 0-based optimizer step the method contract asks for (traced: no device sync).
  step = optimizer.step[...]

  def loss_fn(model):
    # How a method may run the model again (a snapshot, the partners) or the teacher. Built
    # before `model(...)`, which writes this batch's BatchNorm statistics into the model.
    hooks = adapters.nnx_hooks(model, batch["image"],  # [hooks]
                               teacher=teacher)  # [teacher]
    outputs = model(batch["image"])
    per_example, new_method_state, metrics = method.update(
        method_state, outputs, batch, step=step,
        hooks=hooks)  # [hooks]
    return per_example.mean(), (outputs["logits"], new_method_state, metrics)

  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, method_state, metrics)), grads = grad_fn(model)
  optimizer.update(model, grads)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return method_state, dict(metrics, loss=loss, accuracy=accuracy)


def get_batch(train_ds, indices: np.ndarray,
              step: int = 0, partners=None) -> dict[str, np.ndarray]:  # [partner]
  """The training batch of the examples `indices` (at host-side optimizer step `step`)."""
  batch = {"image": train_ds["image"][indices], "label": train_ds["label"][indices]}
  batch["index"] = indices  # [targets]
  if partners is not None:  # [partner]
    # Drawn on the host from (seed, step, index), so they need no device round trip.
    batch["partner_image"] = train_ds["image"][partners.partners(indices, step)]  # [partner]
  return batch


def train_epoch(model: nnx.Module, optimizer: nnx.Optimizer, method_state, train_ds,
                batch_size: int, rng, method: methods.Method,
                epoch: int = 0, partners=None,  # [partner]
                teacher: nnx.Module | None = None):  # [teacher]
  """One pass over `rng.permutation(N)` in batches, the last partial batch dropped.

  Args:
    model: the model, updated in place.
    optimizer: its optimizer, updated in place.
    method_state: the method's state.
    train_ds: the training split (`load_fashion_mnist`).
    batch_size: examples per step.
    rng: a `np.random.Generator`; the epoch's order is its next `permutation(N)`.
    method: the loss transform.
    epoch: 0-based epoch, which with the batch number gives the host-side step.
    partners: a `SameClassPartners` for CS-KD, else None.
    teacher: a frozen teacher `nnx.Module` for KD, else None.

  Returns:
    The new method state and the epoch's per-step metrics, as numpy arrays.
  """
  model.train()
  steps_per_epoch = len(train_ds["label"]) // batch_size
  perms = rng.permutation(len(train_ds["label"]))[:steps_per_epoch * batch_size]
  step_metrics = []
  for i, perm in enumerate(perms.reshape((steps_per_epoch, batch_size))):  # [partner]
    # The host counts steps itself: reading `optimizer.step` would wait for the device.
    step = epoch * steps_per_epoch + i  # [partner]
    batch = get_batch(train_ds, perm,
                      step, partners)  # [partner]
    method_state, metrics = train_step(model, optimizer, method, method_state, batch,
                                       teacher)  # [teacher]
    step_metrics.append(metrics)
  step_metrics = jax.device_get(step_metrics)  # one transfer per epoch, not per step
  return method_state, {k: np.array([m[k] for m in step_metrics]) for k in step_metrics[0]}


@nnx.jit
def eval_step(model: nnx.Module, batch):
  """Summed cross-entropy and number correct of one test batch."""
  logits = model(batch["image"])["logits"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == batch["label"])


def evaluate(model: nnx.Module, test_ds, batch_size: int = 1000):
  """(mean loss, accuracy) over the test split, in eval mode (running BatchNorm statistics)."""
  model.eval()
  sums = [eval_step(model, {k: v[i:i + batch_size] for k, v in test_ds.items()})
          for i in range(0, len(test_ds["label"]), batch_size)]
  model.train()
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
    teacher: for 'kd', a trained teacher `nnx.Module` (left unchanged); None trains one first
      with 'ce' for `teacher_epochs` epochs.
    teacher_epochs: see `teacher`.

  Returns:
    `(model, method_state, summary)`: the trained model (for RAS-KD with its head; the
    backbone is `model.backbone`), the method's final state and a dict with the per-step
    `train_loss`, the last epoch's per-step `metrics`, `test_loss`/`test_accuracy` of every
    epoch and `eval_param_count`, the number of parameters evaluated.
  """
  steps_per_epoch = len(train_ds["label"]) // batch_size
  rngs = nnx.Rngs(seed)
  model = CNN(rngs=rngs)
  # RAS-KD's auxiliary classifier, trained by the same optimizer as the model.
  if method_name == "ras_kd":  # [head]
    model = WithAuxHead(model, rngs=rngs)  # [head]
  method = create_method(method_name, model, train_ds, num_epochs=num_epochs,
                         steps_per_epoch=steps_per_epoch)
  optimizer = nnx.Optimizer(model, optax.sgd(learning_rate, momentum), wrt=nnx.Param)
  method_state = method.init()
  partners = None  # [partner]
  if method_name == "cskd":  # [partner]
    partners = partners_lib.SameClassPartners(train_ds["label"], seed=seed)  # [partner]
  if method_name == "kd" and teacher is None:  # [teacher]
    teacher, _, _ = train_and_evaluate(  # [teacher]
        "ce", train_ds, test_ds, num_epochs=teacher_epochs, seed=seed + 1)  # [teacher]

  rng = np.random.default_rng(seed)
  summary = {"train_loss": [], "test_loss": [], "test_accuracy": []}
  for epoch in range(num_epochs):
    method_state, metrics = train_epoch(model, optimizer, method_state, train_ds, batch_size,
                                        rng, method,
                                        epoch, partners,  # [partner]
                                        teacher)  # [teacher]
    eval_model = model
    # Evaluate (and export) the backbone alone, without RAS-KD's head.
    if method_name == "ras_kd":  # [head]
      eval_model = model.backbone  # [head]
    test_loss, test_accuracy = evaluate(eval_model, test_ds)
    summary["train_loss"].extend(metrics["loss"])
    summary["test_loss"].append(test_loss)
    summary["test_accuracy"].append(test_accuracy)
    logging.info("%s epoch %d: train loss %.4f accuracy %.4f, test loss %.4f accuracy %.4f",
                 method_name, epoch + 1, metrics["loss"].mean(), metrics["accuracy"].mean(),
                 test_loss, test_accuracy)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(eval_model, nnx.Param)))
  summary.update(metrics=metrics, train_loss=np.array(summary["train_loss"]),
                 eval_param_count=num_params)
  return model, method_state, summary


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
  _, _, summary = train_and_evaluate(args.method, train_ds, test_ds,
                                     num_epochs=args.num_epochs, batch_size=args.batch_size,
                                     learning_rate=args.learning_rate)
  print(f"{args.method}: test accuracy {summary['test_accuracy'][-1]:.4f}")


if __name__ == "__main__":
  main()
