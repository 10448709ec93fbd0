"""Talking to Slurm: submit a script, read a job's state, follow it to the end."""

import collections
import os
import re
import subprocess
import sys
import time

# States a job (or array task) does not leave on its own. A requeued job passes through
# REQUEUED and PENDING instead, so following it carries on across restarts.
TERMINAL = frozenset({'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'PREEMPTED',
                      'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE', 'REVOKED'})


class SlurmError(RuntimeError):
  """A Slurm command failed; the message says which and why."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
  except FileNotFoundError as e:
    raise SlurmError(f'{cmd[0]} not found: run this on a Slurm login node') from e


def submit(script_path: str) -> str:
  out = _run(['sbatch', '--parsable', script_path])
  if out.returncode:
    raise SlurmError(f'sbatch {script_path} failed: {out.stderr.strip() or out.stdout.strip()}')
  return out.stdout.strip().split(';')[0]  # "id" or "id;cluster".


def parse_scontrol(text: str) -> list[tuple[str, int]]:
  """(state, exit code) per job or array task in `scontrol -o show job` output."""
  rows = []
  for line in text.splitlines():
    state = re.search(r'\bJobState=(\S+)', line)
    if not state:
      continue
    code = re.search(r'\bExitCode=(\d+):(\d+)', line)
    rows.append((state.group(1), _exit_code(*code.groups()) if code else 0))
  return rows


def parse_sacct(text: str) -> list[tuple[str, int]]:
  """Same, from `sacct -X -n -P -o State,ExitCode` ("CANCELLED by 0|0:15")."""
  rows = []
  for line in text.splitlines():
    if '|' in line:
      state, code = line.split('|')[:2]
      rows.append((state.split()[0], _exit_code(*code.split(':')) if ':' in code else 0))
  return rows


def _exit_code(status: str, signal: str) -> int:
  return 128 + int(signal) if int(signal) else int(status)


def job_states(job_id: str) -> list[tuple[str, int]]:
  """The job's (state, exit code) rows; scontrol first, sacct once the job has aged out."""
  out = _run(['scontrol', '-o', 'show', 'job', job_id])
  if out.returncode == 0 and parse_scontrol(out.stdout):
    return parse_scontrol(out.stdout)
  out = _run(['sacct', '-j', job_id, '-X', '-n', '-P', '-o', 'State,ExitCode'])
  return parse_sacct(out.stdout) if out.returncode == 0 else []


def final_code(rows: list[tuple[str, int]]) -> int:
  """0 if every task completed with 0; else the first failing code (1 if Slurm gave none)."""
  for state, code in rows:
    if state != 'COMPLETED' or code:
      return code or 1
  return 0


class _Tail:
  """Prints what was appended to a file since the last call."""

  def __init__(self, path: str):
    self.path, self.offset = path, 0

  def __call__(self):
    if not self.path or not os.path.exists(self.path):
      return
    if os.path.getsize(self.path) < self.offset:  # Truncated by a restart.
      self.offset = 0
    with open(self.path, 'rb') as f:
      f.seek(self.offset)
      chunk = f.read()
    self.offset += len(chunk)
    sys.stdout.write(chunk.decode(errors='replace'))
    sys.stdout.flush()


def wait(job_id: str, log_path: str = '', poll_s: float = 2.0, lost_after: int = 5) -> int:
  """Follows the job (printing its log) until every task ends; returns its exit code."""
  tail, last, lost = _Tail(log_path), None, 0
  try:
    while True:
      rows = job_states(job_id)
      tail()
      if not rows:
        lost += 1
        if lost >= lost_after:
          print(f'error: Slurm no longer knows job {job_id} (neither scontrol nor sacct)',
                file=sys.stderr)
          return 1
      else:
        lost = 0
        summary = ', '.join(f'{n} {s}' for s, n in
                            sorted(collections.Counter(s for s, _ in rows).items()))
        if summary != last:
          print(f'slurm: job {job_id}: {summary}', flush=True)
          last = summary
        if all(state in TERMINAL for state, _ in rows):
          time.sleep(poll_s)  # The log may still be flushed after the state changes.
          tail()
          code = final_code(rows)
          print(f'slurm: job {job_id} ended with exit code {code}', flush=True)
          return code
      time.sleep(poll_s)
  except KeyboardInterrupt:
    print(f'\nstopped following; job {job_id} keeps running (scancel {job_id} stops it)',
          file=sys.stderr)
    return 130
