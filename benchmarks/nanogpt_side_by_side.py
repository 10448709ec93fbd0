#!/usr/bin/env python3
"""Side by side: nanoGPT's CPU shakespeare_char run against `lm.main` on the same machine.

Runs two trainings one after the other (never at the same time, so they do not
fight over the cores), each as a child process whose wall time and peak RSS are
measured from outside, then prints a markdown table and appends it, with the
exact commands, the machine and the versions, to `--output`.

  (a) nanoGPT: `train.py config/train_shakespeare_char.py` with the small CPU
      settings (4 layers, 4 heads, d=128, context 64, batch 12, no dropout,
      eager, no torch.compile), run with `--torch_python` inside `--nanogpt_dir`.
  (b) ours: `python -m lm.main --config=experiments/shakespeare_char.py`, run
      with `--lm_python` from the repository root; it writes
      `<workdir>/metrics.jsonl`.

This file only orchestrates: it needs nothing beyond the standard library, and
torch is never imported here (nor anywhere in `lm`). nanoGPT's data must be
prepared first (see benchmarks/README.md).

Example:
  .venv/bin/python benchmarks/nanogpt_side_by_side.py \
      --nanogpt_dir=/work/nanogpt --torch_python=/work/torchenv/bin/python
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model both sides train; it must match experiments/shakespeare_char.py.
MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab=65)

NANOGPT_CPU_ARGS = [
    '--device=cpu', '--compile=False', '--eval_iters=20', '--log_interval=1',
    '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4',
    '--n_embd=128', '--dropout=0.0',
]

# nanoGPT prints these two kinds of line.
_NANO_EVAL = re.compile(r'^step (\d+): train loss ([0-9.naif]+), val loss ([0-9.naif]+)')
_NANO_ITER = re.compile(r'^iter (\d+): loss ([0-9.naif]+), time ([0-9.]+)ms')


# --------------------------------------------------------------------------- running a child

def run_measured(cmd, cwd, log_path, env=None, quiet=False):
  """Runs `cmd`, tees its output to `log_path`, returns wall seconds, rc and rusage.

  Peak RSS comes from the kernel's rusage for this one child (os.wait4), so
  runs measured one after another do not see each other's peak. When GNU time
  is installed the command is also wrapped in `/usr/bin/time -v -o <file>` and
  its report is kept next to the log (its figures agree with wait4's).
  """
  gnu_time = shutil.which('time', path='/usr/bin:/bin')
  time_report = log_path + '.time'
  full = ([gnu_time, '-v', '-o', time_report] if gnu_time else []) + list(cmd)
  with open(log_path, 'w') as log:
    log.write('$ ' + shlex.join(cmd) + '\n')
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(full, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)

    def pump():
      for line in proc.stdout:
        log.write(line)
        if not quiet:
          sys.stdout.write(line)
          sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
  peak_kib = usage.ru_maxrss  # Linux: KiB.
  if gnu_time and os.path.exists(time_report):
    with open(time_report) as f:
      m = re.search(r'Maximum resident set size \(kbytes\): (\d+)', f.read())
    if m:
      peak_kib = int(m.group(1))
  return dict(rc=proc.returncode, wall_s=wall, peak_rss_mib=peak_kib / 1024,
              cpu_s=usage.ru_utime + usage.ru_stime,
              time_report=time_report if gnu_time else None)


def _median_after(pairs, skip_steps):
  """Median of the values whose step is past `skip_steps` (all of them if none is)."""
  kept = [v for s, v in pairs if s > skip_steps] or [v for _, v in pairs]
  return statistics.median(kept) if kept else None


# --------------------------------------------------------------------------- parsing

def parse_nanogpt(log_path, skip_steps):
  evals, iters = [], []
  with open(log_path) as f:
    for line in f:
      m = _NANO_EVAL.match(line)
      if m:
        evals.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
        continue
      m = _NANO_ITER.match(line)
      if m:
        iters.append((int(m.group(1)), float(m.group(3))))
  out = dict(final_step=None, val_loss=None, train_loss=None,
             step_ms=_median_after(iters, skip_steps), timed_steps=len(iters))
  if evals:
    out['final_step'], out['train_loss'], out['val_loss'] = evals[-1]
  return out


def parse_lm(metrics_path, skip_steps):
  out = dict(final_step=None, val_loss=None, train_loss=None, step_ms=None, timed_steps=0)
  if not os.path.exists(metrics_path):
    return out
  evals, trains, perf = [], [], []
  with open(metrics_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      step = rec.get('step')
      if step is None:
        continue
      if rec.get('eval/loss') is not None:
        evals.append((step, float(rec['eval/loss'])))
      if rec.get('train/loss') is not None:
        trains.append((step, float(rec['train/loss'])))
      if rec.get('perf/step_time_ms') is not None:
        perf.append((step, float(rec['perf/step_time_ms'])))
  # The first perf record can include compilation; drop it when there are others.
  perf.sort()
  if len(perf) > 1:
    perf = perf[1:]
  out['step_ms'] = _median_after(perf, skip_steps)
  out['timed_steps'] = len(perf)
  if evals:
    out['final_step'], out['val_loss'] = max(evals)
  if trains:
    out['train_loss'] = max(trains)[1]
  return out


# --------------------------------------------------------------------------- machine facts

def _capture(cmd):
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def machine_facts():
  model, cores = platform.processor() or '?', str(os.cpu_count())
  for line in _capture(['lscpu']).splitlines():
    key, _, value = line.partition(':')
    if key.strip() == 'Model name':
      model = value.strip()
    elif key.strip() == 'CPU(s)':
      cores = value.strip()
  return dict(cpu=model, cores=cores, mem_gib=_mem_gib(), kernel=platform.release())


def _mem_gib():
  try:
    with open('/proc/meminfo') as f:
      kib = int(f.readline().split()[1])
    return f'{kib / 2**20:.0f}'
  except (OSError, ValueError, IndexError):
    return '?'


def package_version(python, module):
  if not python:
    return 'n/a'
  out = _capture([python, '-c', f'import {module}; print({module}.__version__)'])
  return out.splitlines()[-1] if out else 'missing'


def git_head(path):
  return _capture(['git', '-C', path, 'rev-parse', '--short', 'HEAD']) or '?'


# --------------------------------------------------------------------------- peak FLOP/s

_PEAK_CODE = r'''
import sys, time
n, reps, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
flop = 2.0 * n ** 3
if backend == 'numpy':
    import numpy as np
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    run = lambda: a @ b
else:
    import jax, jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    run = lambda: mm(a, b).block_until_ready()
for _ in range(2):
    run()
best = float('inf')
for _ in range(reps):
    t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
print(f'{backend}: {n}x{n} float32 matmul, best of {reps}: {best * 1e3:.1f} ms, '
      f'{flop / best / 1e9:.1f} GFLOP/s')
'''


def measure_peak(python, backends, n=2048, reps=10):
  lines = []
  for backend in backends:
    res = subprocess.run([python, '-c', _PEAK_CODE, str(n), str(reps), backend],
                         capture_output=True, text=True)
    line = res.stdout.strip() or f'{backend}: failed: {res.stderr.strip().splitlines()[-1:]}'
    print(line)
    lines.append(line)
  return lines


def model_flops_per_step(m=MODEL):
  """Training FLOPs of one step, our own estimate: 6 * matmul params * tokens + attention.

  Matmul params: per block 4 d^2 (qkv + out) + 8 d^2 (MLP 4x), plus the
  output projection d * vocab. Attention scores and mixing add 12 * L * d * T
  per token (forward + backward). Embedding lookups and norms are ignored.
  """
  d, layers, t = m['n_embd'], m['n_layer'], m['block_size']
  matmul_params = layers * 12 * d * d + d * m['vocab']
  per_token = 6 * matmul_params + 12 * layers * d * t
  return per_token * t * m['batch_size']


# --------------------------------------------------------------------------- report

def _fmt(x, spec):
  return 'n/a' if x is None else format(x, spec)


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def table(rows):
  """rows: list of (name, result dict). Last line is lm / nanoGPT."""
  flops = model_flops_per_step()
  head = ('| run | rc | final step | val loss | train loss | median step (ms) | '
          'est. GFLOP/s | wall (s) | CPU user+sys (s) | peak RSS (MiB) |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for name, r in rows:
    gflops = None if not r.get('step_ms') else flops / (r['step_ms'] / 1e3) / 1e9
    lines.append(
        f"| {name} | {r['rc']} | {_fmt(r['final_step'], 'd')} | {_fmt(r['val_loss'], '.4f')} | "
        f"{_fmt(r['train_loss'], '.4f')} | {_fmt(r['step_ms'], '.2f')} | {_fmt(gflops, '.2f')} | "
        f"{_fmt(r['wall_s'], '.1f')} | {_fmt(r['cpu_s'], '.1f')} | {_fmt(r['peak_rss_mib'], '.0f')} |")
  results = dict(rows)
  if 'nanoGPT' in results and 'lm' in results:
    a, b = results['lm'], results['nanoGPT']
    cells = [_ratio(a[k], b[k]) for k in ('val_loss', 'train_loss', 'step_ms')]
    lines.append(
        f"| lm / nanoGPT | | | {_fmt(cells[0], '.3f')} | {_fmt(cells[1], '.3f')} | "
        f"{_fmt(cells[2], '.3f')} | | {_fmt(_ratio(a['wall_s'], b['wall_s']), '.3f')} | "
        f"{_fmt(_ratio(a['cpu_s'], b['cpu_s']), '.3f')} | "
        f"{_fmt(_ratio(a['peak_rss_mib'], b['peak_rss_mib']), '.3f')} |")
  return '\n'.join(lines)


NOTES = """\
Notes:
- val loss: nanoGPT's is the mean over `eval_iters` random windows of val.bin (last 10% of
  input.txt) at its last eval; ours is `eval/loss` at the last step that has one in
  metrics.jsonl, measured on our own eval batches of the TFDS `validation` split (a different
  slice of the text). Same model and data family, not the same eval set: compare loosely.
- train loss: nanoGPT's is the same random-window estimate on train.bin; ours is the last
  logged `train/loss`.
- median step: nanoGPT's per-iter `time` (includes data fetch; iters with an eval also
  include the eval) over iters past --skip_steps; ours is the median of
  `perf/step_time_ms` records past --skip_steps, its first record dropped (may hold compile).
- wall: whole child process, startup, imports, data loading and compilation included.
- peak RSS: kernel max RSS of the child process (rusage / GNU time).
- est. GFLOP/s: one shared FLOP estimate of this model per step divided by the median step time.
"""


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--nanogpt_dir', default='/work/nanogpt',
                 help='nanoGPT work tree with data/shakespeare_char/{train,val}.bin prepared.')
  p.add_argument('--torch_python', default='/work/torchenv/bin/python',
                 help='Python of a venv with torch and numpy (never the lm venv).')
  p.add_argument('--lm_python', default=sys.executable, help='Python that has `lm` installed.')
  p.add_argument('--steps', type=int, default=2000,
                 help='Steps for both sides (nanoGPT: max_iters = lr_decay_iters = steps).')
  p.add_argument('--data_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'tfds'),
                 help='TFDS data dir for our side.')
  p.add_argument('--lm_config', default='experiments/shakespeare_char.py')
  p.add_argument('--only', choices=('both', 'nanogpt', 'lm'), default='both')
  p.add_argument('--nanogpt_extra', default='',
                 help='Extra nanoGPT args (one string, shell-split), appended last so they win, '
                      'e.g. "--max_iters=50 --eval_interval=25".')
  p.add_argument('--lm_extra', default='', help='Extra lm.main args (one string, shell-split).')
  p.add_argument('--skip_steps', type=int, default=10,
                 help='Steps at or below this are left out of the median step time.')
  p.add_argument('--workdir', default='',
                 help='Where logs and run dirs go (default: a fresh temp dir, kept).')
  p.add_argument('--output', default='',
                 help='Markdown file the report is appended to (default: a temp file).')
  p.add_argument('--measure_peak', action='store_true',
                 help='Also time a 2048x2048 float32 matmul (numpy and jax, with --lm_python).')
  p.add_argument('--peak_only', action='store_true', help='Only --measure_peak, no training.')
  p.add_argument('--quiet', action='store_true', help="Do not echo the children's output.")
  args = p.parse_args(argv)

  output = args.output or tempfile.mkstemp(prefix='nanogpt_side_by_side_', suffix='.md')[1]
  facts = machine_facts()
  when = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  machine = (f'{facts["cpu"]}, {facts["cores"]} CPUs, {facts["mem_gib"]} GiB, '
             f'Linux {facts["kernel"]}')

  peak_lines = []
  if args.measure_peak or args.peak_only:
    peak_lines = measure_peak(args.lm_python, ['numpy', 'jax'])
    if args.peak_only:
      with open(output, 'a') as f:
        f.write('\n'.join(['', f'### CPU float32 matmul peak ({when})', '',
                           f'- machine: {machine}', *[f'- {l}' for l in peak_lines], '']))
      print(f'appended to {output}')
      return 0

  workdir = args.workdir or tempfile.mkdtemp(prefix='nanogpt_side_by_side_')
  os.makedirs(workdir, exist_ok=True)
  print(f'workdir: {workdir}\noutput:  {output}', flush=True)

  rows, commands = [], []
  if args.only in ('both', 'nanogpt'):
    nano_dir = os.path.abspath(args.nanogpt_dir)
    for f in ('train.bin', 'val.bin', 'meta.pkl'):
      if not os.path.exists(os.path.join(nano_dir, 'data', 'shakespeare_char', f)):
        p.error(f'{nano_dir}/data/shakespeare_char/{f} missing: run its prepare.py first '
                '(benchmarks/README.md)')
    cmd = [args.torch_python, 'train.py', 'config/train_shakespeare_char.py', *NANOGPT_CPU_ARGS,
           f'--max_iters={args.steps}', f'--lr_decay_iters={args.steps}',
           f'--out_dir={os.path.join(workdir, "nanogpt_out")}', *shlex.split(args.nanogpt_extra)]
    commands.append(f'(cd {nano_dir} && {shlex.join(cmd)})')
    print(f'\n=== nanoGPT: {commands[-1]}', flush=True)
    log = os.path.join(workdir, 'nanogpt.log')
    res = run_measured(cmd, nano_dir, log, quiet=args.quiet)
    res.update(parse_nanogpt(log, args.skip_steps))
    rows.append(('nanoGPT', res))

  if args.only in ('both', 'lm'):
    lm_workdir = os.path.join(workdir, 'lm_run')
    cmd = [args.lm_python, '-m', 'lm.main', f'--config={args.lm_config}',
           f'--workdir={lm_workdir}', f'--config.data.data_dir={args.data_dir}',
           f'--config.train.steps={args.steps}', *shlex.split(args.lm_extra)]
    commands.append(f'(cd {REPO_ROOT} && {shlex.join(cmd)})')
    print(f'\n=== lm: {commands[-1]}', flush=True)
    log = os.path.join(workdir, 'lm.log')
    res = run_measured(cmd, REPO_ROOT, log, quiet=args.quiet)
    res.update(parse_lm(os.path.join(lm_workdir, 'metrics.jsonl'), args.skip_steps))
    rows.append(('lm', res))

  tab = table(rows)
  torch_v = package_version(args.torch_python, 'torch') if args.only != 'lm' else 'n/a'
  jax_v = package_version(args.lm_python, 'jax') if args.only != 'nanogpt' else 'n/a'
  env_vars = {k: os.environ[k] for k in ('XLA_FLAGS', 'JAX_PLATFORMS', 'OMP_NUM_THREADS',
                                         'MKL_NUM_THREADS') if k in os.environ}
  header = [
      f'### nanoGPT vs lm, shakespeare_char, {args.steps} steps ({when})', '',
      f'- machine: {machine}',
      f'- versions: jax {jax_v}, torch {torch_v}, python {platform.python_version()} (driver); '
      f'lm {git_head(REPO_ROOT)}, nanoGPT {git_head(args.nanogpt_dir) if args.only != "lm" else "n/a"}',
      f'- env: {env_vars or "no XLA/thread overrides"}',
      f'- this script: `{shlex.join([sys.executable, *sys.argv])}`',
      *[f'- command: `{c}`' for c in commands],
      f'- logs: {workdir}',
      *[f'- peak: {l}' for l in peak_lines],
      '', '',
  ]
  report = '\n'.join(header) + tab + '\n\n' + NOTES
  print('\n' + report)
  with open(output, 'a') as f:
    f.write('\n' + report)
  print(f'appended to {output}')
  return 0 if all(r['rc'] == 0 for _, r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
