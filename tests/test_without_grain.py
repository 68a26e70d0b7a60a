"""Without grain installed (as on a GPU image that has JAX but not this project's data stack),
the trainer still imports and launch.py still runs; only a grain reader is refused, in one line
that says what to do (exit 1). grain is blocked in a fresh interpreter: `sys.modules['grain'] =
None` makes `import grain` raise ImportError."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)

LAUNCH_WITHOUT_GRAIN = """
import runpy, sys
sys.modules['grain'] = None
sys.argv = ['launch.py', *sys.argv[1:]]
runpy.run_path('launch.py', run_name='__main__')
"""


def _launch_without_grain(*flags):
  return subprocess.run([sys.executable, "-c", LAUNCH_WITHOUT_GRAIN, *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": ROOT})


def test_launch_runs_and_a_grain_reader_says_what_to_do(tmp_path):
  result = _launch_without_grain("--help")
  assert result.returncode == 0 and "--config" in result.stdout, result.stderr[-3000:]

  result = _launch_without_grain(
      "--config=configs/fashion_mnist/ce.py", "--config.data.name=synthetic",
      "--config.data.reader=grain", "--config.num_epochs=1", "--config.progress_bar=False",
      f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "needs the 'grain' package" in errors[0]
  assert "--config.data.reader=threads" in errors[0]
  assert "Traceback" not in result.stderr
