"""Metrics to `metrics.jsonl` and TensorBoard, a live progress line, and MFU.

`read`/`read_file` are the one reader of metrics.jsonl (plots, curves, sweep summaries). A
kill or a full disk can leave its last line cut short: readers skip a line that is not a JSON
object (with one warning naming it), and the next `Writer` cuts it off before appending.
"""

import functools
import json
import math
import os
import sys
import time

import numpy as np

# Dense peak FLOP/s per device for the compute dtype that matters there (bf16 on accelerators).
# Matched against `device.device_kind` by substring, first hit wins.
PEAK_FLOPS = (
    ('H200', 989e12),
    ('H100', 989e12),   # SXM; the PCIe card is lower (756e12).
    ('A100', 312e12),
    ('L4', 121e12),
    ('A10', 125e12),
    ('V100', 125e12),
    ('TPU v6', 918e12),
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
)


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 20) -> float:
  """float32 matmul FLOP/s of this host through XLA: the honest peak for CPU MFU."""
  # JAX is imported where it is needed: launchers read metrics.jsonl through this module and
  # never need JAX (0.75 s to import).
  import jax  # pylint: disable=g-import-not-at-top
  x = jax.device_put(np.ones((n, n), np.float32), jax.devices('cpu')[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(repeats):
      y = matmul(x)
    y.block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 * repeats / best


def peak_flops_per_device(device=None) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    # Fake CPU devices share the host's cores: each gets its share of the measured peak.
    return measured_cpu_peak() / len(jax.local_devices())
  for name, flops in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
      return flops
  return math.nan


class Writer:
  """Process 0 writes; other processes' writes are no-ops."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      path = os.path.join(workdir, 'metrics.jsonl')
      cut_torn_last_line(path)
      self._jsonl = open(path, 'a', buffering=1)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = _plain(metrics)
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self, quiet: bool = False) -> None:
    """Closes both files, once; `quiet` drops their errors (another one is being reported)."""
    if not self.enabled:
      return
    self.enabled = False
    error = None
    for f in (self._jsonl, self._tb):
      try:
        if f is not None:
          f.close()
      except OSError as e:  # A full disk: the last flush fails.
        error = error or e
    if error is not None and not quiet:
      raise error


def append_row(workdir: str, step: int, metrics: dict) -> None:
  """Appends one row with a single write, for a process that is not the run's writer
  (--mode=eval): the line lands whole even while the run appends its own."""
  row = json.dumps({'step': int(step), **_plain(metrics)}) + '\n'
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, 'rb') as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        row = '\n' + row  # Never glue onto a torn last line.
  with open(path, 'ab') as f:
    f.write(row.encode())


def _plain(metrics: dict) -> dict:
  return {k: (v if isinstance(v, str) else float(v) if np.ndim(v) == 0
              else np.asarray(v).tolist()) for k, v in metrics.items()}


def cut_torn_last_line(path: str) -> None:
  """Removes a last line that has no newline: a row cut short by a kill or a full disk.

  Appending after it would glue the next row onto it, and neither would parse. Every row is
  written with its newline in one write, so only a dead writer leaves a line without one.
  """
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return
    keep = size
    while keep > 0:  # Back to the newline before the torn line (or the start of the file).
      step = min(keep, 1 << 16)
      f.seek(keep - step)
      chunk = f.read(step)
      newline = chunk.rfind(b'\n')
      if newline >= 0:
        keep = keep - step + newline + 1
        break
      keep -= step
    f.seek(keep)
    torn = f.read()
    f.truncate(keep)
  print(f'warning: {path}: removed a last line cut short by an earlier run '
        f'({len(torn)} bytes: {torn[:80]!r})', file=sys.stderr, flush=True)


def read_file(path: str) -> list[dict]:
  """The rows of a metrics.jsonl, skipping (with a warning) any line that does not parse."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        row = json.loads(raw)
      except ValueError:  # JSONDecodeError and UnicodeDecodeError both.
        row = None
      if not isinstance(row, dict):
        print(f'warning: {path}:{number}: skipping a line that is not a JSON object (cut '
              f'short by a kill or a full disk?): {raw[:80]!r}', file=sys.stderr, flush=True)
        continue
      rows.append(row)
  return rows


def read(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (see `read_file`); [] if there is none."""
  return read_file(os.path.join(workdir, 'metrics.jsonl'))


class Progress:
  """One live line: step, loss, throughput and ETA (a carriage return on terminals)."""

  def __init__(self, total_steps: int, unit: str, enabled: bool = True):
    self.total, self.unit, self.enabled = total_steps, unit, enabled
    self.tty = sys.stdout.isatty()

  def update(self, step: int, loss: float, per_s: float, step_s: float, final: bool = False):
    if not self.enabled:
      return
    line = f'step {step}/{self.total}  loss {loss:.4f}'
    if math.isfinite(step_s):
      eta = (self.total - step) * step_s
      line += (f'  {per_s:,.0f} {self.unit}/s  {step_s * 1e3:.1f} ms/step  ETA {_hms(eta)}')
    if self.tty and not final:
      print('\r' + line, end='', flush=True)
    else:
      print(('\r' if self.tty else '') + line, flush=True)


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
