#!/usr/bin/env python3
"""Training images/s of our CIFAR models beside the same models written in PyTorch, on this CPU.

For each model (the seed CNN of experiments/cifar10_simple_cnn.py and the ResNet-20 of
experiments/cifar10_resnet20.py) the driver alternates two kinds of measurement:

  ours:  the real jitted `Trainer.train_step` built from the experiment file (its optimizer,
         batch size, label smoothing and NaN guard), fed as `Trainer._loop` feeds it: build
         batch N on the host (`train_batch` + `to_global`), dispatch step N, then block on
         step N-1's metrics. Step time is the wall time of one such iteration, so host batch
         assembly counts wherever it does not overlap compute; data time is reported apart.
  torch: the same network, optimizer and batch size in PyTorch (eager, fp32, a fixed random
         batch, `torch.set_num_threads(--threads)`), in NCHW and in channels-last. It runs
         as a child process, `--torch_python <this file> --worker=torch`, so torch is never
         imported by the driver, by `lm`, or by the interpreter that runs JAX.

Runs are interleaved (ours, torch, torch channels-last, then again, `--rounds` times) and
each side keeps the best of its per-run medians, which damps the noise of a shared machine.
The load average is recorded at the start of every run.

  .venv/bin/python benchmarks/cifar_throughput.py --torch_python=/work/torchenv/bin/python

Data: `--data_dir` (default ../shared/tfds beside the repository), capped at
`--max_examples` images per split so that loading takes seconds; batches then repeat, which
does not change the cost of a step. Our side splits the CPU into devices as `lm.main` does
(one per core, data parallel) unless XLA_FLAGS sets a device count; the device count and
XLA flags are printed with the result.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENTS = {
    'simple_cnn': 'experiments/cifar10_simple_cnn.py',
    'resnet20': 'experiments/cifar10_resnet20.py',
}
# (warm-up steps, timed steps) per run; a ResNet-20 step at batch 256 takes about a second.
DEFAULT_STEPS = {'simple_cnn': (20, 200), 'resnet20': (3, 20)}
TORCH_FORMATS = ('nchw', 'channels_last')


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='simple_cnn,resnet20',
                 help=f'comma-separated, from {", ".join(EXPERIMENTS)}')
  p.add_argument('--rounds', type=int, default=2, help='interleaved runs of each side')
  p.add_argument('--steps', type=int, default=0, help='timed steps per run (0: per model)')
  p.add_argument('--warmup', type=int, default=0, help='untimed steps per run (0: per model)')
  p.add_argument('--only', choices=('ours', 'torch'), default=None, help='run one side only')
  p.add_argument('--torch_formats', default=','.join(TORCH_FORMATS),
                 help='torch memory formats to time, from nchw,channels_last')
  p.add_argument('--data_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'tfds'))
  p.add_argument('--max_examples', type=int, default=2048)
  p.add_argument('--torch_python', default='/work/torchenv/bin/python')
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  p.add_argument('--omp_wait_policy', default='PASSIVE',
                 help="OMP_WAIT_POLICY for the torch child ('' keeps OpenMP's default). Under "
                      'load, spinning OpenMP threads make small torch steps up to 20x slower')
  p.add_argument('--output', default='', help='append the report to this file too')
  # Worker mode (the torch child); the driver fills these in.
  p.add_argument('--worker', choices=('torch',), default=None, help=argparse.SUPPRESS)
  p.add_argument('--model', default='', help=argparse.SUPPRESS)
  p.add_argument('--batch_size', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--optim', default='{}', help=argparse.SUPPRESS)
  p.add_argument('--memory_format', default='nchw', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _summary(step_ms, data_ms=None, **extra) -> dict:
  out = {'median_ms': statistics.median(step_ms), 'steps': len(step_ms), **extra}
  if data_ms:
    out['data_ms'] = statistics.median(data_ms)
  return out


# --------------------------------------------------------------------------------- torch side

def _torch_model(name: str, num_classes: int = 10):
  """The same networks as lm.cnn, in PyTorch's layout (NCHW weights, flatten over C, H, W)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn
  import torch.nn.functional as F

  class SeedCNN(nn.Module):
    # 32x32 -> conv 30 -> pool 15 -> conv 13 -> pool 6 -> conv 4: 64 * 4 * 4 features.
    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleList([nn.Conv2d(3, 32, 3), nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3)])
      self.hidden = nn.Linear(64 * 4 * 4, 64)
      self.out = nn.Linear(64, num_classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.convs[0](x)), 2)
      x = F.max_pool2d(F.relu(self.convs[1](x)), 2)
      x = F.relu(self.convs[2](x))
      return self.out(F.relu(self.hidden(torch.flatten(x, 1))))

  def conv_bn(cin, cout, stride):
    # PyTorch's BN momentum 0.1 is Flax's 0.9; both use eps 1e-5.
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-5)]

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv_bn(cin, cout, stride)
      self.conv2, self.bn2 = conv_bn(cout, cout, 1)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.stride != 1 or self.extra:
        # Option A: subsample, then zero channels split around the old ones.
        x = F.pad(x[:, :, ::self.stride, ::self.stride],
                  (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(x + y)

  class CifarResNet(nn.Module):
    def __init__(self, blocks, widths=(16, 32, 64)):
      super().__init__()
      self.conv, self.bn = conv_bn(3, widths[0], 1)
      layers, cin = [], widths[0]
      for stage, cout in enumerate(widths):
        for block in range(blocks):
          layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*layers)
      self.fc = nn.Linear(cin, num_classes)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
      x = self.blocks(F.relu(self.bn(self.conv(x))))
      return self.fc(x.mean(dim=(2, 3)))

  if name == 'simple_cnn':
    return SeedCNN()
  if name == 'resnet20':
    return CifarResNet(blocks=3)
  raise ValueError(f'no torch twin for {name!r}')


def _torch_optimizer(model, spec: dict):
  import torch  # pylint: disable=g-import-not-at-top
  if spec['name'] == 'adam':
    return torch.optim.Adam(model.parameters(), lr=spec['lr'], betas=(spec['b1'], spec['b2']),
                            eps=spec['eps'])
  if spec['name'] == 'sgd':
    # As lm.optim: L2 on conv and dense kernels only, not on biases or BatchNorm.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD([{'params': decay, 'weight_decay': spec['weight_decay']},
                            {'params': rest, 'weight_decay': 0.0}],
                           lr=spec['lr'], momentum=spec['momentum'], nesterov=spec['nesterov'])
  raise ValueError(f'no torch optimizer for {spec["name"]!r}')


def torch_worker(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  spec = json.loads(args.optim)
  model = _torch_model(args.model)
  opt = _torch_optimizer(model, spec)
  x = torch.randn(args.batch_size, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch_size,))
  if args.memory_format == 'channels_last':
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  model.train()
  step_ms = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, label_smoothing=spec['label_smoothing'])
    loss.backward()
    opt.step()
    loss.item()  # CPU autograd is synchronous already; this keeps the loop honest anyway.
    if i >= args.warmup:
      step_ms.append((time.perf_counter() - t0) * 1e3)
  return _summary(step_ms, params=sum(p.numel() for p in model.parameters()),
                  version=torch.__version__, threads=torch.get_num_threads())


def run_torch(args, model: str, batch_size: int, optim_spec: dict, memory_format: str,
              warmup: int, steps: int) -> dict:
  cmd = [args.torch_python, os.path.abspath(__file__), '--worker=torch', f'--model={model}',
         f'--batch_size={batch_size}', f'--optim={json.dumps(optim_spec)}',
         f'--memory_format={memory_format}', f'--warmup={warmup}', f'--steps={steps}',
         f'--threads={args.threads}']
  env = dict(os.environ)
  if args.omp_wait_policy:
    env['OMP_WAIT_POLICY'] = args.omp_wait_policy
  done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  if done.returncode:
    raise RuntimeError(f'torch worker failed ({done.returncode}):\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- our side

def load_config(model: str, data_dir: str, max_examples: int):
  from lm import config as lm_config  # pylint: disable=g-import-not-at-top
  config = lm_config.load(os.path.join(REPO_ROOT, EXPERIMENTS[model]))
  config.data.data_dir = data_dir
  config.data.max_examples = max_examples
  return config


def optim_spec(config) -> dict:
  """What the torch twin needs to build the same optimizer and loss."""
  o = config.optim
  return {'name': o.name, 'lr': o.lr, 'b1': o.b1, 'b2': o.b2, 'eps': o.eps,
          'momentum': o.momentum, 'nesterov': bool(o.nesterov), 'weight_decay': o.weight_decay,
          'label_smoothing': config.train.label_smoothing}


class Ours:
  """One Trainer and its state, kept across runs so the step compiles once."""

  def __init__(self, config):
    from lm import train  # pylint: disable=g-import-not-at-top
    self._workdir = tempfile.TemporaryDirectory(prefix='cifar_throughput_')
    self.trainer = train.Trainer(config, self._workdir.name)
    self.state = self.trainer.compile_and_init()  # As Trainer.run() starts.
    self.next_step = 0

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
  return f'{name}, {os.cpu_count()} CPUs'


def _jax_devices() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return f'{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)'


def _versions(torch_version: str) -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return (f'python {platform.python_version()}, jax {jax.__version__}, jaxlib '
          f'{jaxlib.__version__}, flax {flax.__version__}, optax {optax.__version__}, '
          f'torch {torch_version}')


def _row(model, batch, impl, r, ref_ms=None):
  ips = batch / r['median_ms'] * 1e3
  data = f'{r["data_ms"]:.2f}' if 'data_ms' in r else '-'
  ratio = f'{r["median_ms"] / ref_ms:.2f}x' if ref_ms else '-'
  return (f'| {model} | {batch} | {impl} | {r["median_ms"]:.1f} | {ips:,.0f} | {data} | '
          f'{ratio} | {r["load"]:.2f} |')


def report(args, results: dict, batches: dict, torch_version: str) -> str:
  lines = [
      '| model | batch | implementation | median ms/step | images/s | data ms/step | '
      'ours / this (speed) | load avg (1 min) |',
      '|---|---|---|---|---|---|---|---|']
  for model, sides in results.items():
    best = {impl: min(runs, key=lambda r: r['median_ms']) for impl, runs in sides.items()}
    ours = best.get('ours')
    for impl, r in best.items():
      ratio_ref = ours['median_ms'] if ours and impl != 'ours' else None
      label = 'ours (JAX, jitted Trainer.train_step)' if impl == 'ours' else f'PyTorch {impl}'
      lines.append(_row(model, batches[model], label, r, ratio_ref))
  flags = os.environ.get('XLA_FLAGS', '').strip()
  omp = args.omp_wait_policy or 'unset'
  lines += [
      '',
      f'Command: `{" ".join([os.path.relpath(sys.executable, REPO_ROOT)] + sys.argv)}`' +
      (f' with XLA_FLAGS="{flags}"' if flags else ''),
      f'Machine: {_machine()}; ours on {_jax_devices()}; '
      f'date: {datetime.datetime.now().isoformat(timespec="minutes")}',
      f'Versions: {_versions(torch_version)}',
      f'Best median of {args.rounds} interleaved runs per row; "ours / this" > 1 means ours is '
      'faster. Our step includes host batch assembly (train_batch + to_global) where it does '
      'not overlap compute; torch trains on a fixed random batch, with '
      f'torch.set_num_threads({args.threads}) and OMP_WAIT_POLICY={omp}.',
  ]
  return '\n'.join(lines)


def main(argv=None):
  args = _parse_args(argv)
  if args.worker == 'torch':
    print(json.dumps(torch_worker(args)), flush=True)
    return
  models = [m for m in args.models.split(',') if m]
  formats = [f for f in args.torch_formats.split(',') if f]
  if len(models) > 1 and args.only != 'torch':
    # The CPU device split is fixed when JAX starts and differs between experiments, so each
    # model gets its own process.
    given = sys.argv[1:] if argv is None else argv
    for model in models:  # argparse keeps the last --models.
      subprocess.run([sys.executable, os.path.abspath(__file__), *given, f'--models={model}'],
                     check=True)
    return
  results, batches, torch_version = {}, {}, 'not run'
  if args.only != 'torch':
    # The device split `python -m lm.main` picks for this config (one per core when the batch
    # divides, unless mesh.cpu_devices says otherwise); an XLA_FLAGS device count wins.
    from lm import config as lm_config  # pylint: disable=g-import-not-at-top
    lm_config.split_cpu_devices(load_config(models[0], args.data_dir, args.max_examples))
  for model in models:
    config = load_config(model, args.data_dir, args.max_examples)
    batches[model] = config.train.batch_size
    warmup = args.warmup or DEFAULT_STEPS[model][0]
    steps = args.steps or DEFAULT_STEPS[model][1]
    ours = Ours(config) if args.only != 'torch' else None
    results[model] = sides = {}
    for rnd in range(args.rounds):
      runs = [] if args.only == 'torch' else [('ours', None)]
      if args.only != 'ours':
        runs += [(f'({f})', f) for f in formats]
      for impl, fmt in runs:
        load = os.getloadavg()[0]
        if fmt is None:
          r = ours.run(warmup, steps)
        else:
          r = run_torch(args, model, config.train.batch_size, optim_spec(config), fmt,
                        warmup, steps)
          torch_version = r['version']
        r['load'] = load
        sides.setdefault(impl, []).append(r)
        print(f'{model} round {rnd + 1} {impl}: {r["median_ms"]:.1f} ms/step, '
              f'{batches[model] / r["median_ms"] * 1e3:,.0f} images/s'
              + (f', data {r["data_ms"]:.2f} ms' if 'data_ms' in r else '')
              + f', {r["params"]:,} params, load {load:.2f}', flush=True)
  text = report(args, results, batches, torch_version)
  print('\n' + text, flush=True)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(text + '\n\n')


if __name__ == '__main__':
  main()
