"""Child processes for the local launchers: prefixed output, signal forwarding, fail-fast.

Each child gets its own process group, so a Ctrl-C in the terminal reaches it once (through
the launcher's forwarding) rather than twice; the trainer reads a second signal as "stop now".
Children also receive SIGTERM if the launcher dies, so none outlives it and holds a workdir.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_print_lock = threading.Lock()


def _die_with_parent():
  """preexec_fn: the kernel sends SIGTERM to this child when the launcher exits (Linux)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
  except (OSError, AttributeError):  # Not Linux: children may outlive a killed launcher.
    pass


class Child:
  """One subprocess, its merged stdout/stderr printed with `prefix` or appended to `log_path`.

  A logging child writes its file itself rather than through a pipe to the launcher: should
  the launcher die, a pipe would break and the child's next print would fail mid-save.
  """

  def __init__(self, cmd: list[str], env: dict, prefix: str = '', log_path: str = ''):
    self.cmd, self.prefix = cmd, prefix
    self._log = open(log_path, 'ab') if log_path else None
    self.proc = subprocess.Popen(
        cmd, env=env, stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    self._reader = None
    if not self._log:
      self._reader = threading.Thread(target=self._pump, daemon=True)
      self._reader.start()

  def _pump(self):
    for line in self.proc.stdout:
      with _print_lock:
        sys.stdout.write(self.prefix + line.decode(errors='replace'))
        sys.stdout.flush()
    self.proc.stdout.close()

  def poll(self):
    return self.proc.poll()

  def signal(self, signum: int):
    """Signals the child's whole process group (the trainer and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.killpg(self.proc.pid, signum)

  def finish(self) -> int:
    """Waits for exit and for the last line of output; returns the exit code."""
    code = self.proc.wait()
    if self._reader:
      self._reader.join()
    if self._log:
      self._log.close()
    return code


@contextlib.contextmanager
def forward_signals(children_fn):
  """While active, SIGINT/SIGTERM to the launcher go to every live child, once each."""
  received = []

  def handler(signum, frame):
    del frame
    received.append(signum)
    for c in children_fn():
      if c.poll() is None:
        c.signal(signum)

  old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def kill_after(children: list[Child], grace_s: float):
  """SIGKILL whatever has not exited on its own within grace_s."""
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(c.poll() is None for c in children):
    time.sleep(0.05)
  for c in children:
    if c.poll() is None:
      c.signal(signal.SIGKILL)


def describe_exit(code: int) -> str:
  if code < 0:
    try:
      name = f' ({signal.Signals(-code).name})'
    except ValueError:
      name = ''
    return f'was killed by signal {-code}{name}'
  return f'exited with code {code}'


def run_group(cmds: list[list[str]], envs: list[dict], prefixes: list[str],
              grace_s: float = 3.0, advice=None) -> int:
  """Runs the commands together as one job; the first non-zero exit ends it and is returned.

  The others cannot go on without the failed one: their next collective (or the barrier of
  a checkpoint save, or JAX's shutdown) would wait for it until JAX's heartbeat times out,
  a minute later, and abort. So they get `grace_s` to exit on their own (all may be failing
  alike, and each says why), then SIGKILL, not SIGTERM: a save needs every process. One
  line then says which process failed and `advice(exit code)` what to do.
  """
  children = []
  with forward_signals(lambda: children):
    for cmd, env, prefix in zip(cmds, envs, prefixes):
      children.append(Child(cmd, env, prefix))
    while True:
      codes = [c.poll() for c in children]
      failed = next((c for c, code in zip(children, codes) if code not in (None, 0)), None)
      if failed is not None or all(code == 0 for code in codes):
        break
      time.sleep(0.05)
    if failed is not None:
      kill_after(children, grace_s)
    for c in children:
      c.finish()
  if failed is None:
    return 0
  code = failed.poll()
  others = len(children) - 1
  line = f'{failed.prefix}{describe_exit(code)}'
  if others:
    line += f'; stopped the other {others} process{"es" if others > 1 else ""}'
  tail = advice(code) if advice else ''
  with _print_lock:
    print(line + (f'. {tail}' if tail else ''), file=sys.stderr, flush=True)
  return _exit_code(code)


def _exit_code(code: int) -> int:
  """A child killed by signal N reports -N; shells report that as 128 + N."""
  return 128 - code if code < 0 else code
