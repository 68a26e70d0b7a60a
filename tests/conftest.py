"""Every test process sees 4 fake CPU devices, so 1-device and 4-device runs can be compared.

The flag must be set before jax is imported anywhere, which is why it lives here.

Compiled programs are cached on disk for the session (JAX's persistent compilation cache), and
the subprocesses the launch tests start inherit the cache: a killed-and-resumed run compiles the
same train step as the uninterrupted one, so it is compiled once (the suite runs ~25% faster).
The cache is keyed by the program, the XLA flags and the jaxlib version, so the second pass of
the cross-device tests under another XLA configuration (.ci/run) compiles its own.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="selfkd_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
