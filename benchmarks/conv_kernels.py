#!/usr/bin/env python3
"""ResNet-20's convolutions one at a time: XLA:CPU (through JAX) against PyTorch's oneDNN.

Where `cifar_throughput.py` times whole training steps, this times the three passes of each
of ResNet-20's 3x3 stride-1 convolutions (one per stage: 32x32x16, 16x16x32, 8x8x64) at the
batch one CPU device sees in training (256 split over 2 devices: 128), so a gap in the step
can be traced to the kernels that cause it:

  fwd    y = conv(x, w)
  dgrad  dx from dy (the input gradient)
  wgrad  dw from x and dy (the kernel gradient): XLA's own rule, `lm.cnn._kernel_grad`
         (the formulation the models use), and one matmul over an im2col of x

JAX runs each pass as one jitted function on one XLA:CPU device (all cores); PyTorch runs
`torch.ops.aten.convolution` / `convolution_backward` eagerly with `torch.set_num_threads`
equal to the core count, in NCHW and in channels-last, as a child process
(`--torch_python <this file> --worker=torch`) so torch never shares an interpreter with JAX.
Each figure is the median of --rounds runs of --iters calls. For scale, the JAX side also
times a 1024x1024x1024 float32 `jnp.dot`: what XLA:CPU's matmuls reach on this machine.

  .venv/bin/python benchmarks/conv_kernels.py --torch_python=/work/torchenv/bin/python
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (height = width, channels in = channels out) of ResNet-20's stride-1 convs, per stage.
SHAPES = ((32, 16), (16, 32), (8, 64))


def _time(fn, iters: int, rounds: int) -> float:
  """Median ms per call of `fn()` (which blocks until its result is ready) over `rounds`."""
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      fn()
    times.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(times)


def jax_worker(args) -> dict:
  sys.path.insert(0, REPO_ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lm import cnn  # pylint: disable=g-import-not-at-top

  pad = ((1, 1), (1, 1))

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=cnn._NHWC)  # pylint: disable=protected-access

  passes = {
      'fwd': conv,
      'dgrad': lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
      'wgrad (XLA rule)': lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0],
      'wgrad (lm.cnn)': lambda x, w, dy: cnn._kernel_grad(x, dy, (3, 3), (1, 1), pad),  # pylint: disable=protected-access
      'wgrad (im2col matmul)': lambda x, w, dy: _im2col_wgrad(x, dy),
  }
  out = {}
  key = jax.random.PRNGKey(0)
  for hw, c in SHAPES:
    x = jax.random.normal(key, (args.batch, hw, hw, c))
    w = jax.random.normal(key, (3, 3, c, c)) * 0.1
    dy = jax.random.normal(key, (args.batch, hw, hw, c))
    for name, fn in passes.items():
      step = jax.jit(fn)
      operands = (x, w) if name == 'fwd' else (x, w, dy)
      out[f'{hw}x{hw}x{c} {name}'] = _time(
          lambda: jax.block_until_ready(step(*operands)), args.iters, args.rounds)
  a = jax.random.normal(key, (1024, 1024))
  dot = jax.jit(jnp.dot)
  out['matmul 1024^3'] = _time(lambda: jax.block_until_ready(dot(a, a)), args.iters, args.rounds)
  return {'impl': f'JAX {jax.__version__}, {jax.device_count()} XLA:CPU device', 'ms': out}


def _im2col_wgrad(x_BxHxWxC, dy_BxHxWxO):
  """The 3x3 'same' kernel gradient as one matmul: the 9 shifted copies of x against dy."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, h, w, c = x_BxHxWxC.shape
  x = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
  return jnp.einsum('bhwk,bhwo->ko', patches, dy_BxHxWxO).reshape(3, 3, c, -1)


def torch_worker(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  results = {}
  for fmt in ('nchw', 'channels_last'):
    out = {}
    for hw, c in SHAPES:
      memory_format = torch.channels_last if fmt == 'channels_last' else torch.contiguous_format
      x = torch.randn(args.batch, c, hw, hw).contiguous(memory_format=memory_format)
      w = (torch.randn(c, c, 3, 3) * 0.1).contiguous(memory_format=memory_format)
      dy = torch.randn(args.batch, c, hw, hw).contiguous(memory_format=memory_format)
      conv_args = ((1, 1), (1, 1), (1, 1), False, (0, 0), 1)
      passes = {
          'fwd': lambda: torch.ops.aten.convolution(x, w, None, *conv_args),
          'dgrad': lambda: torch.ops.aten.convolution_backward(
              dy, x, w, None, *conv_args, (True, False, False)),
          'wgrad': lambda: torch.ops.aten.convolution_backward(
              dy, x, w, None, *conv_args, (False, True, False)),
      }
      with torch.no_grad():
        for name, fn in passes.items():
          out[f'{hw}x{hw}x{c} {name}'] = _time(fn, args.iters, args.rounds)
    results[fmt] = out
  return {'impl': f'PyTorch {torch.__version__}, {args.threads} threads', 'ms': results}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--torch_python', default='', help='a Python with torch installed')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--worker', choices=('jax', 'torch'), default=None)
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps((jax_worker if args.worker == 'jax' else torch_worker)(args)))
    return
  common = [f'--batch={args.batch}', f'--iters={args.iters}', f'--rounds={args.rounds}',
            f'--threads={args.threads}']

  def child(python, worker):
    done = subprocess.run([python, os.path.abspath(__file__), f'--worker={worker}', *common],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f'the {worker} worker failed: {done.stderr.strip().splitlines()[-1]}')
    return json.loads(done.stdout.strip().splitlines()[-1])

  ours = child(sys.executable, 'jax')
  theirs = child(args.torch_python, 'torch') if args.torch_python else None
  print(f'batch {args.batch}; {ours["impl"]}' + (f'; {theirs["impl"]}' if theirs else ''))
  print(f'load average {os.getloadavg()[0]:.2f}')
  matmul_ms = ours['ms'].pop('matmul 1024^3')
  print(f'(XLA:CPU matmul, 1024^3 float32: {matmul_ms:.2f} ms, '
        f'{2 * 1024**3 / matmul_ms / 1e6:.0f} GFLOP/s)\n')
  print('| conv, pass | JAX ms | GFLOP/s | PyTorch NCHW ms | PyTorch channels-last ms | '
        'JAX / channels-last time |')
  print('|---|---|---|---|---|---|')
  for key, ms in ours['ms'].items():
    hw, c = (int(v) for v in key.split()[0].split('x')[1:])
    flops = 2 * args.batch * hw * hw * c * c * 9
    row = f'| {key} | {ms:.2f} | {flops / ms / 1e6:.0f} |'
    if theirs:
      torch_key = key.split(' (')[0]  # One PyTorch wgrad for each of our formulations.
      nchw, cl = theirs['ms']['nchw'][torch_key], theirs['ms']['channels_last'][torch_key]
      row += f' {nchw:.2f} | {cl:.2f} | {ms / cl:.2f}x |'
    print(row)


if __name__ == '__main__':
  main()
