"""The README's own-loop example runs with nothing but the transform from selfkd_jax."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys
sys.path.insert(0, "examples")
import own_loop_pskd
accuracy = own_loop_pskd.main(num_epochs=8)
ours = sorted(m for m in sys.modules if m.startswith("selfkd_jax"))
print("ACCURACY", accuracy)
print("MODULES", ",".join(ours))
"""


def test_own_loop_example_trains_without_our_trainer():
  result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
  assert float(lines["ACCURACY"]) > 0.9  # 297 held-out digits; chance is 0.1
  modules = lines["MODULES"].split(",")
  assert "selfkd_jax.methods" in modules
  for forbidden in ("selfkd_jax.train", "selfkd_jax.data", "selfkd_jax.models"):
    assert not any(m.startswith(forbidden) for m in modules), modules
