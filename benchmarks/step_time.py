#!/usr/bin/env python3
"""Time one experiment's jitted train step on this machine, with its memory by phase.

Builds the real `Trainer` from an experiment file, compiles the step and creates the state as
`Trainer.run()` does, then times `--steps` steps fed as the training loop feeds them (dispatch
step N, then block on step N-1's metrics) from a few pre-built batches: the step alone.

  .venv/bin/python benchmarks/step_time.py --config=experiments/shakespeare_char.py --devices=2
  .venv/bin/python benchmarks/step_time.py --config=... --devices=2 --mesh=1,2,1   # fsdp=2
  .venv/bin/python benchmarks/step_time.py --config=... --devices=1 --xla_flags=--xla_cpu_use_onednn=true
  .venv/bin/python benchmarks/step_time.py --config=... --devices=2 --profile      # where it goes

--devices sets the CPU device count (XLA's --xla_force_host_platform_device_count) and, unless
--mesh says otherwise, a data-parallel mesh over all of them. --profile traces 20 steps with
jax.profiler and prints the time per device and step in each kind of XLA op. Memory is the
process's RSS (current, and the peak so far) after each phase.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import resource
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss(phase: str) -> None:
  with open('/proc/self/status') as f:
    current = int(f.read().split('VmRSS:')[1].split()[0]) // 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  print(f'memory after {phase:<16} {current:5d} MiB (peak so far {peak} MiB)', flush=True)


def _op_kind(name: str) -> str | None:
  """Groups the profiler's XLA op names; None for runtime and Python events."""
  if name.startswith(('$', 'Thunk', 'Pjit', 'Slinky', 'Wait', 'Rendezvous', 'Common',
                      'ParseArguments', '[')):
    return None
  if name.startswith('ynn_fusion'):
    return 'matmuls (YNNPACK fusions)'
  if name.startswith(('dot', 'convolution')):
    return 'dots and convolutions (XLA)'
  if 'all-reduce' in name or 'reduce-scatter' in name or 'all-gather' in name:
    return 'collectives (incl. waiting)'
  return 'elementwise and layout fusions'


def _profile(step, state, batches, devices: int, n: int = 20) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(n):
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
    path = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
    with gzip.open(path[0]) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  totals = collections.Counter()
  for e in events:
    kind = _op_kind(e.get('name', '')) if e.get('ph') == 'X' else None
    if kind:
      totals[kind] += e.get('dur', 0)
  print(f'\nprofile, ms per device per step ({n} steps traced):')
  for kind, us in totals.most_common():
    print(f'  {kind:<32} {us / 1e3 / n / devices:6.2f}')
  print(f'  {"sum":<32} {sum(totals.values()) / 1e3 / n / devices:6.2f}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='experiments/shakespeare_char.py')
  p.add_argument('--devices', type=int, default=1, help='CPU devices to split the host into')
  p.add_argument('--mesh', default='', help='data,fsdp,tensor (default: data = --devices)')
  p.add_argument('--xla_flags', default='', help='appended to XLA_FLAGS')
  p.add_argument('--data_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'tfds'))
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--profile', action='store_true')
  args = p.parse_args(argv)
  os.environ['XLA_FLAGS'] = ' '.join(filter(None, [
      os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={args.devices}',
      args.xla_flags]))
  sys.path.insert(0, REPO_ROOT)

  import jax  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import sharding  # pylint: disable=g-import-not-at-top
  from lm import train  # pylint: disable=g-import-not-at-top
  _rss('imports')
  config = config_lib.load(os.path.join(REPO_ROOT, args.config))
  config.data.data_dir = args.data_dir
  data, fsdp, tensor = (map(int, args.mesh.split(',')) if args.mesh else (args.devices, 1, 1))
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  workdir = tempfile.TemporaryDirectory(prefix='step_time_')
  trainer = train.Trainer(config, workdir.name)
  _rss('data and model')
  step = trainer.train_step
  start = time.perf_counter()
  state = trainer.compile_and_init()  # As Trainer.run() starts.
  _rss('compile and init')
  print(f'compile and init took {time.perf_counter() - start:.1f} s', flush=True)
  batches = [sharding.to_global(trainer.task.data.train_batch(i), trainer.mesh)
             for i in range(8)]
  state, pending = step(state, batches[0])
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready(pending)
    pending = metrics
    times.append(time.perf_counter() - start)
  jax.block_until_ready(state)
  _rss(f'{args.steps} steps')
  print(f'\n{args.config}: {jax.device_count()} CPU devices, mesh {dict(trainer.mesh.shape)}, '
        f'XLA_FLAGS="{os.environ["XLA_FLAGS"]}"')
  print(f'median step {statistics.median(times) * 1e3:.1f} ms over {args.steps} steps '
        f'(mean {statistics.mean(times) * 1e3:.1f} ms), load average at the end '
        f'{os.getloadavg()[0]:.2f}')
  if args.profile:
    _profile(step, state, batches, jax.device_count())


if __name__ == '__main__':
  main()
