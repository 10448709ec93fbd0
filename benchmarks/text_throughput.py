#!/usr/bin/env python3
"""Training examples/s of the SST-2 classifier beside the same model in PyTorch, on this CPU.

  ours:  the real jitted `Trainer.train_step` built from experiments/sst2.py (its Adam, clip,
         dropout and NaN guard) on SST-2 batches, fed as `Trainer._loop` feeds it: build batch
         N on the host (`train_batch` + `to_global`), dispatch step N, then block on step N-1's
         metrics. Step time is one such iteration, so host batch assembly counts where it does
         not overlap compute.
  torch: `nn.TransformerEncoder` of the same width, depth, heads, MLP width (GELU, pre-norm,
         no biases in the blocks, final LayerNorm), learned positions, the same vocabulary,
         sequence length, batch, dropout, padding mask, masked mean pooling and linear head;
         `torch.optim.Adam` with the same betas and eps and the same global-norm clip. Eager,
         fp32, a fixed random batch, `torch.set_num_threads(--threads)`. It runs as a child,
         `--torch_python <this file> --worker=torch`, so torch is never imported by `lm` or by
         the interpreter that runs JAX.

Runs are interleaved (ours, torch, ours, torch, ... `--rounds` times) and each side keeps the
best of its per-run medians, which damps the noise of a shared machine; the load average is
recorded at the start of every run.

  python3 -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy
  .venv/bin/python benchmarks/text_throughput.py --output=docs/TEXT_CLASSIFICATION.md
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's `lm`, not whichever one the venv has installed.
sys.path.insert(0, REPO_ROOT)
EXPERIMENT = 'experiments/sst2.py'


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rounds', type=int, default=3, help='interleaved runs of each side')
  p.add_argument('--steps', type=int, default=200, help='timed steps per run')
  p.add_argument('--warmup', type=int, default=20, help='untimed steps per run')
  p.add_argument('--only', choices=('ours', 'torch'), default=None, help='run one side only')
  p.add_argument('--data_dir',
                 default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'text', 'sst2'))
  p.add_argument('--torch_python', default='/work/torchenv/bin/python')
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  p.add_argument('--omp_wait_policy', default='PASSIVE',
                 help="OMP_WAIT_POLICY for the torch child ('' keeps OpenMP's default); "
                      'spinning OpenMP threads slow small steps on a loaded machine')
  p.add_argument('--output', default='', help='append the report to this file too')
  # Worker mode (the torch child); the driver fills this in.
  p.add_argument('--worker', choices=('torch',), default=None, help=argparse.SUPPRESS)
  p.add_argument('--spec', default='{}', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _summary(step_ms, data_ms=None, **extra) -> dict:
  out = {'median_ms': statistics.median(step_ms), 'steps': len(step_ms), **extra}
  if data_ms:
    out['data_ms'] = statistics.median(data_ms)
  return out


# --------------------------------------------------------------------------------- torch side

def torch_worker(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn
  import torch.nn.functional as F
  s = json.loads(args.spec)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)

  class Classifier(nn.Module):

    def __init__(self):
      super().__init__()
      d = s['d_model']
      self.embedding = nn.Embedding(s['vocab_size'], d)
      self.pos_embedding = nn.Parameter(torch.randn(s['seq_len'], d) * 0.02)
      self.dropout = nn.Dropout(s['dropout'])
      layer = nn.TransformerEncoderLayer(d, s['num_heads'], s['mlp_dim'], s['dropout'],
                                         activation='gelu', batch_first=True, norm_first=True,
                                         bias=False)
      self.encoder = nn.TransformerEncoder(layer, s['num_layers'],
                                           norm=nn.LayerNorm(d, bias=False),
                                           enable_nested_tensor=False)
      self.head = nn.Linear(d, s['num_classes'])

    def forward(self, tokens_BxL, mask_BxL):
      x = self.embedding(tokens_BxL) + self.pos_embedding[:tokens_BxL.shape[1]]
      x = self.encoder(self.dropout(x), src_key_padding_mask=~mask_BxL)
      weights_BxL = mask_BxL.float() / mask_BxL.float().sum(1, keepdim=True).clamp(min=1)
      return self.head(torch.einsum('bld,bl->bd', x, weights_BxL))

  model = Classifier()
  opt = torch.optim.Adam(model.parameters(), lr=s['lr'], betas=(s['b1'], s['b2']), eps=s['eps'])
  b, length = s['batch_size'], s['max_len']
  tokens = torch.randint(3, s['vocab_size'], (b, length))
  lengths = torch.randint(1, length + 1, (b,))
  mask = torch.arange(length)[None, :] < lengths[:, None]
  labels = torch.randint(0, s['num_classes'], (b,))
  model.train()
  step_ms = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tokens, mask), labels)
    loss.backward()
    if s['clip_norm']:
      torch.nn.utils.clip_grad_norm_(model.parameters(), s['clip_norm'])
    opt.step()
    loss.item()
    if i >= args.warmup:
      step_ms.append((time.perf_counter() - t0) * 1e3)
  return _summary(step_ms, params=sum(p.numel() for p in model.parameters()),
                  version=torch.__version__, threads=torch.get_num_threads())


def run_torch(args, spec: dict) -> dict:
  cmd = [args.torch_python, os.path.abspath(__file__), '--worker=torch',
         f'--spec={json.dumps(spec)}', f'--warmup={args.warmup}', f'--steps={args.steps}',
         f'--threads={args.threads}']
  env = dict(os.environ)
  if args.omp_wait_policy:
    env['OMP_WAIT_POLICY'] = args.omp_wait_policy
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    raise RuntimeError(f'torch worker failed ({done.returncode}):\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- our side

def load_config(data_dir: str):
  spec = importlib.util.spec_from_file_location('experiment_sst2',
                                                os.path.join(REPO_ROOT, EXPERIMENT))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = data_dir
  return config


class Ours:
  """One Trainer and its state, kept across runs so the step compiles once."""

  def __init__(self, config):
    from lm import train  # pylint: disable=g-import-not-at-top
    self._workdir = tempfile.TemporaryDirectory(prefix='text_throughput_')
    self.trainer = train.Trainer(config, self._workdir.name)
    self.state = self.trainer.compile_and_init()  # As Trainer.run() starts.
    self.next_step = 0

  def spec(self) -> dict:
    """What the torch twin needs to build the same model, batch and optimizer."""
    t = self.trainer
    m, o = t.task.model.config, t.config.optim
    return {'vocab_size': m.vocab_size, 'd_model': m.d_model, 'num_layers': m.num_layers,
            'num_heads': m.num_heads, 'mlp_dim': m.mlp_dim, 'seq_len': m.seq_len,
            'dropout': m.dropout, 'num_classes': t.task.num_classes,
            'max_len': t.task.data.max_len, 'batch_size': t.config.train.batch_size,
            'lr': o.lr, 'b1': o.b1, 'b2': o.b2, 'eps': o.eps, 'clip_norm': o.clip_norm}

  def run(self, warmup: int, steps: int) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from lm import sharding  # pylint: disable=g-import-not-at-top
    t = self.trainer
    step_ms, data_ms, pending = [], [], None
    last = time.perf_counter()
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      batch = sharding.to_global(t.task.data.train_batch(self.next_step), t.mesh)
      t1 = time.perf_counter()
      self.state, metrics = t.train_step(self.state, batch)
      self.next_step += 1
      if pending is not None:
        jax.block_until_ready(pending)
      pending = metrics
      now = time.perf_counter()
      if i >= warmup:
        step_ms.append((now - last) * 1e3)
        data_ms.append((t1 - t0) * 1e3)
      last = now
    jax.block_until_ready((self.state, pending))
    if not bool(pending['finite']):
      raise RuntimeError('our step went non-finite; the timing would not be a training step')
    return _summary(step_ms, data_ms, params=t.param_count)


# ------------------------------------------------------------------------------------ report

def _machine() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    name = next(l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name'))
  except (OSError, StopIteration):
    name = platform.processor() or 'unknown CPU'
  return f'{name}, {os.cpu_count()} cores'


def _versions(torch_version: str) -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return (f'python {platform.python_version()}, jax {jax.__version__}, jaxlib '
          f'{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}, '
          f'torch {torch_version}')


def report(args, spec: dict, runs: dict, torch_version: str, devices: str) -> str:
  best = {side: min(rs, key=lambda r: r['median_ms']) for side, rs in runs.items()}
  b = spec['batch_size']
  lines = ['| implementation | params | median ms/step | examples/s | data ms/step | '
           'ours / this (speed) | load avg (1 min) per run |',
           '|---|---|---|---|---|---|---|']
  for side, r in best.items():
    label = ('ours (JAX, jitted Trainer.train_step)' if side == 'ours' else
             f'PyTorch {torch_version} nn.TransformerEncoder (eager)')
    ratio = (f'{r["median_ms"] / best["ours"]["median_ms"]:.2f}x'
             if side != 'ours' and 'ours' in best else '-')
    data = f'{r["data_ms"]:.2f}' if 'data_ms' in r else '-'
    loads = ', '.join(f'{x["load"]:.1f}' for x in runs[side])
    lines.append(f'| {label} | {r["params"]:,} | {r["median_ms"]:.2f} | '
                 f'{b / r["median_ms"] * 1e3:,.0f} | {data} | {ratio} | {loads} |')
  lines += [
      '',
      f'Model: {EXPERIMENT}: vocab {spec["vocab_size"]:,}, {spec["num_layers"]} block(s) of '
      f'width {spec["d_model"]}, {spec["num_heads"]} heads, MLP {spec["mlp_dim"]}, sequence '
      f'{spec["max_len"]}, batch {b}, dropout {spec["dropout"]}, Adam, clip '
      f'{spec["clip_norm"]}.',
      f'Command: `{" ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO_ROOT)] + (sys.argv[1:]))}`',
      f'Machine: {_machine()}; ours on {devices}; '
      f'date: {datetime.datetime.now().isoformat(timespec="minutes")}',
      f'Versions: {_versions(torch_version)}',
      f'Best median of {args.rounds} interleaved runs of {args.steps} steps per row; "ours / '
      'this" > 1 means ours is faster. torch trains on a fixed random batch with '
      f'torch.set_num_threads({args.threads}) and OMP_WAIT_POLICY='
      f'{args.omp_wait_policy or "unset"}.',
  ]
  return '\n'.join(lines)


def main(argv=None):
  args = _parse_args(argv)
  if args.worker == 'torch':
    print(json.dumps(torch_worker(args)), flush=True)
    return
  config = load_config(args.data_dir)
  from lm import config as lm_config  # pylint: disable=g-import-not-at-top
  lm_config.split_cpu_devices(config)  # The device split `python -m lm.main` would use.
  import jax  # pylint: disable=g-import-not-at-top
  devices = f'{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)'
  ours = Ours(config)  # Built even for --only=torch: the spec comes from the real model.
  spec = ours.spec()
  runs, torch_version = {}, 'not run'
  for rnd in range(args.rounds):
    sides = [s for s in ('ours', 'torch') if args.only in (None, s)]
    for side in sides:
      load = os.getloadavg()[0]
      r = ours.run(args.warmup, args.steps) if side == 'ours' else run_torch(args, spec)
      if side == 'torch':
        torch_version = r['version']
      r['load'] = load
      runs.setdefault(side, []).append(r)
      print(f'round {rnd + 1} {side}: {r["median_ms"]:.2f} ms/step, '
            f'{spec["batch_size"] / r["median_ms"] * 1e3:,.0f} examples/s, '
            f'{r["params"]:,} params, load {load:.2f}', flush=True)
  text = report(args, spec, runs, torch_version, devices)
  print('\n' + text, flush=True)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(text + '\n\n')


if __name__ == '__main__':
  main()
