"""Files of a run directory that are not checkpoints or metrics: written whole or not at all."""

import contextlib
import json
import os
import tempfile


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers (and a kill mid-write) see the old or the new file,
  never part of one: a temporary file in the same directory, then a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of the workdir.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj) -> None:
  write_atomic(path, json.dumps(obj, indent=1))


@contextlib.contextmanager
def atomic_path(path: str):
  """A temporary path to write (by any library) that becomes `path` when the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{base}.', suffix=ext)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
