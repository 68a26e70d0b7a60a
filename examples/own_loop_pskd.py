"""PS-KD inside your own training loop: a plain-JAX model, your own data, no selfkd_jax trainer.

    python examples/own_loop_pskd.py

The only things taken from selfkd_jax are the transform (`methods.pskd`) and its contract: keep
its state next to your parameters, pass `outputs` (a dict with 'logits') and `batch` (a dict
with 'label' and the dataset 'index'), and average the per-example loss yourself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from selfkd_jax import methods


def init_mlp(rng, sizes):
  """A plain-JAX MLP: a list of (weight, bias) pairs."""
  params = []
  for key, (fan_in, fan_out) in zip(jax.random.split(rng, len(sizes) - 1),
                                    zip(sizes[:-1], sizes[1:])):
    params.append((jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
                   jnp.zeros(fan_out)))
  return params


def mlp(params, x):
  for weight, bias in params[:-1]:
    x = jax.nn.relu(x @ weight + bias)
  weight, bias = params[-1]
  return x @ weight + bias


def main(num_epochs: int = 20, batch_size: int = 64, seed: int = 0) -> float:
  digits = load_digits()
  images = digits.data.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  train, test = order[:1500], order[1500:]
  num_train, num_classes = len(train), 10

  steps_per_epoch = num_train // batch_size  # the loop below drops the last partial batch
  method = methods.pskd(num_examples=num_train, num_classes=num_classes,
                        total_epochs=num_epochs, steps_per_epoch=steps_per_epoch, alpha_T=0.8)
  tx = optax.sgd(0.1, momentum=0.9)
  params = init_mlp(jax.random.PRNGKey(seed), [64, 128, num_classes])
  opt_state = tx.init(params)
  method_state = method.init()  # past predictions: [num_train, num_classes]

  @jax.jit
  def train_step(params, opt_state, method_state, batch, step):

    def loss_fn(params):
      outputs = {"logits": mlp(params, batch["image"])}
      per_example, new_method_state, _ = method.update(method_state, outputs, batch,
                                                       step=step)
      return per_example.mean(), new_method_state

    (loss, method_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, method_state, loss

  step = 0
  for epoch in range(num_epochs):
    # `index` is the position in *your* training set: it addresses the past predictions.
    permutation = np.random.default_rng([seed, epoch]).permutation(num_train)
    for start in range(0, num_train - batch_size + 1, batch_size):
      index = permutation[start:start + batch_size]
      batch = {"image": images[train[index]], "label": labels[train[index]], "index": index}
      params, opt_state, method_state, loss = train_step(params, opt_state, method_state,
                                                         batch, step)
      step += 1
  accuracy = float(np.mean(np.argmax(mlp(params, images[test]), -1) == labels[test]))
  print(f"test accuracy {accuracy:.4f}, last loss {float(loss):.4f}")
  return accuracy


if __name__ == "__main__":
  main()
