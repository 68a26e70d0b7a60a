"""Without grain installed (as on a GPU image that has JAX but not this project's data stack),
the trainer still imports and launch.py still starts; only a grain reader is refused, in one
line that says what to do. grain is blocked in a fresh interpreter (`sys.modules['grain'] =
None` makes `import grain` raise ImportError)."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)

CHECK = """
import runpy, sys
sys.modules['grain'] = None
import selfkd_jax.train.loop, selfkd_jax.train.config_check  # the whole trainer
from selfkd_jax.data import DataError, grain_reader
try:
  grain_reader.GrainReader(lambda key: key, [0, 1])
except DataError as error:
  print('refused:', error)
sys.argv = ['launch.py', '--help']
runpy.run_path('launch.py', run_name='__main__')
"""


def test_trainer_imports_and_grain_reader_says_what_to_do():
  result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr[-3000:]
  refused = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
  assert len(refused) == 1, result.stdout[-3000:]
  assert "needs the 'grain' package" in refused[0]
  assert "--config.data.reader=threads" in refused[0]
  assert "--config" in result.stdout.split(refused[0])[1]  # launch.py's help followed
