"""PS-KD inside your own training loop: plain JAX (no Flax), your own data, no selfkd_jax trainer.

    PYTHONPATH=. python examples/own_loop_pskd.py

The only things taken from selfkd_jax are the transform (`methods.pskd`) and its contract: keep
its state next to your parameters, pass `outputs` (a dict with 'logits') and `batch` (a dict
with 'label' and the dataset 'index'), and average the per-example loss yourself. The data are
the IDX files of Debian's `dataset-fashion-mnist`, read with numpy below. For the same in Flax
Linen or NNX, with one method of every family, see `flax_linen_fashion_mnist.py` and
`flax_nnx_fashion_mnist.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfkd_jax import methods

from fashion_mnist_data import DATA_DIR, load_split

def init_mlp(rng, sizes):
  """A plain-JAX MLP: a list of (weight, bias) pairs, He-initialised."""
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


def main(num_epochs: int = 10, batch_size: int = 128, seed: int = 0, limit_train: int = 0,
         limit_test: int = 0, data_dir: str = DATA_DIR):
  """Trains the MLP with PS-KD; returns (test accuracy, final method state, visited indices)."""
  train_images, train_labels = load_split("train", limit_train, data_dir)
  test_images, test_labels = load_split("t10k", limit_test, data_dir)
  # The MLP takes flat vectors: [N, 28, 28, 1] -> [N, 784].
  train_images = train_images.reshape(len(train_images), -1)
  test_images = test_images.reshape(len(test_images), -1)
  num_train, num_classes = len(train_labels), 10

  steps_per_epoch = num_train // batch_size  # the loop below drops the last partial batch
  method = methods.pskd(num_examples=num_train, num_classes=num_classes,
                        total_epochs=num_epochs, steps_per_epoch=steps_per_epoch, alpha_T=0.8)
  tx = optax.sgd(0.05, momentum=0.9)
  params = init_mlp(jax.random.key(seed), [784, 256, num_classes])
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

  step, visited = 0, np.zeros(num_train, bool)
  rng = np.random.default_rng(seed)
  for _ in range(num_epochs):
    # `index` is the position in *your* training set: it addresses the past predictions.
    permutation = rng.permutation(num_train)
    for start in range(0, steps_per_epoch * batch_size, batch_size):
      index = permutation[start:start + batch_size]
      batch = {"image": train_images[index], "label": train_labels[index], "index": index}
      # `step` counts on the host: the 0-based optimizer step, without a device round trip.
      params, opt_state, method_state, loss = train_step(params, opt_state, method_state,
                                                         batch, step)
      visited[index] = True
      step += 1
  logits = jax.jit(mlp)(params, test_images)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_labels))
  print(f"test accuracy {accuracy:.4f}, last loss {float(loss):.4f}")
  return accuracy, method_state, np.flatnonzero(visited)


if __name__ == "__main__":
  main()
