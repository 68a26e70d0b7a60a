"""Colour augmentation of ImageNet training recipes, on float images in [0, 1] before normalising.

PS-KD's official ImageNet pipeline (its `utils/custom_transform.py`, from fb.resnet.torch by way
of convNet.pytorch) runs, after `ToTensor` and before `Normalize`:

- `ColorJitter(brightness=b, contrast=c, saturation=s)`: the three in a random order, each a
  linear interpolation `x + a * (target - x)` with `a` uniform in [-v, v]: brightness towards
  black (0), contrast towards the image's mean grey level (one scalar), saturation towards each
  pixel's grey level. Grey is `0.299 R + 0.587 G + 0.114 B`. Nothing is clipped. (As the grey
  weights sum to 1, the three commute: the random order changes only float round-off. It is
  kept, as drawn, to stay the script's computation.)
- `Lighting(alphastd)`: AlexNet's PCA noise: `x + eigvec @ (alpha * eigval)` per channel, with
  `alpha ~ N(0, alphastd²)` three times and ImageNet's RGB eigenvalues and eigenvectors.

The functions take the draws as arguments (pure, per image); `augment.augment_batch` draws them
per example from the example's key, so they are the same on any device count and on resume.
"""
import jax
import jax.numpy as jnp
import numpy as np

# ImageNet's RGB covariance, as AlexNet's lighting noise and PS-KD's script use it.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float32)
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def grey(image: jax.Array) -> jax.Array:
  """[H, W, 1] grey level of an RGB float image (the weights of their `Grayscale`)."""
  return jnp.sum(image * _GREY, axis=-1, keepdims=True)


def _brightness(image, alpha):
  return image + alpha * (0.0 - image)


def _contrast(image, alpha):
  return image + alpha * (jnp.mean(grey(image)) - image)


def _saturation(image, alpha):
  return image + alpha * (grey(image) - image)


_JITTERS = (_brightness, _contrast, _saturation)


def color_jitter(image: jax.Array, order: jax.Array, alphas: jax.Array) -> jax.Array:
  """Brightness, contrast and saturation applied in `order` (a permutation of 0, 1, 2 naming
  them in that order) with strengths `alphas[0], alphas[1], alphas[2]` (one per transform, in
  the transforms' own order); `image` float [H, W, 3] in [0, 1]."""
  for position in range(3):
    which = order[position]
    image = jax.lax.switch(which, _JITTERS, image, alphas[which])
  return image


def lighting(image: jax.Array, alpha: jax.Array) -> jax.Array:
  """AlexNet's PCA lighting noise with the three normal draws `alpha` (already scaled by the
  standard deviation); `image` float [H, W, 3]."""
  shift = jnp.asarray(IMAGENET_EIGVEC) @ (alpha * jnp.asarray(IMAGENET_EIGVAL))
  return image + shift


def color_augment(image: jax.Array, key: jax.Array, jitter: float, lighting_std: float
                  ) -> jax.Array:
  """`color_jitter` with every strength `jitter` (PS-KD: 0.4), then `lighting` with
  `lighting_std` (PS-KD: 0.1), drawn from `key`; either 0 skips it. Float [H, W, 3] in, out."""
  order_key, alpha_key, light_key = jax.random.split(key, 3)
  if jitter > 0:
    order = jax.random.permutation(order_key, 3)
    alphas = jax.random.uniform(alpha_key, (3,), minval=-jitter, maxval=jitter)
    image = color_jitter(image, order, alphas)
  if lighting_std > 0:
    image = lighting(image, lighting_std * jax.random.normal(light_key, (3,)))
  return image
