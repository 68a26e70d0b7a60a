"""NumPy references the tests compare the JAX code against (float64 unless asked, last axis)."""
import numpy as np


def log_softmax(z, dtype=np.float64):
  z = np.asarray(z, dtype)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z, dtype=np.float64):
  return np.exp(log_softmax(z, dtype))
