"""Files replaced in one step: readers see the old contents or the new, never half of them."""

import contextlib
import os
import tempfile

# At import, the portable way (setting the umask is the only way to read it, and not safe
# once other threads create files); Linux reports the current one in /proc.
_UMASK_AT_IMPORT = os.umask(0)
os.umask(_UMASK_AT_IMPORT)


def _umask() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return _UMASK_AT_IMPORT


@contextlib.contextmanager
def replaced_atomically(path: str, mode: str = "w"):
  """A file object whose contents replace `path` when the block ends without an error.

  Written to a temporary file in the same directory, then renamed over `path`. The temporary
  file is owner-only (tempfile's choice); it gets the permissions a plain `open()` would give
  before the rename, so results on a shared cluster stay readable by the group as usual.
  """
  directory = os.path.dirname(os.path.abspath(path))
  handle = tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, suffix=".tmp")
  try:
    with handle:
      yield handle
    os.chmod(handle.name, 0o666 & ~_umask())
    os.replace(handle.name, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(handle.name)
    raise
