"""What a user's own loop imports needs only the core install (jax, flax, optax, numpy)."""

import subprocess
import sys

TRAINER_ONLY = ("grain", "orbax", "tensorflow_datasets", "ml_collections", "matplotlib",
                "tensorboardX", "sklearn", "tensorflow")


def test_core_modules_import_no_trainer_dependency():
  code = ("import sys\n"
          "from selfkd_jax import models\n"
          "models.exits.make_exits  # the documented path, before heads imports the module\n"
          "from selfkd_jax import adapters, heads, losses, methods, models, partners\n"
          "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  loaded = set(result.stdout.split())
  assert "selfkd_jax" in loaded and "flax" in loaded  # the probe itself worked
  assert not loaded & set(TRAINER_ONLY), sorted(loaded & set(TRAINER_ONLY))
