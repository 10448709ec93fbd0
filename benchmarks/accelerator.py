#!/usr/bin/env python3
"""Everything the code does on one GPU, measured by one command in under 8 minutes.

  python benchmarks/accelerator.py --output=accelerator.json   # on the GPU machine
  python benchmarks/accelerator.py --smoke                     # every item on CPU, tiny shapes

Items, in order of importance (each in its own process, so each has its own device-memory
peak and a crash costs one item; `--smoke` runs them all in one. The script starts an item
only while its estimate fits in what is left of `--budget_s`, and records the ones it skips):

  gpt2_small   experiments/gpt2_small.py (124M with GPT-2's 50,257-token vocab, bf16, context
               1024, batch 64): training tokens/s, step time, MFU against the device's bf16
               peak (lm/metrics.py PEAK_FLOPS, looked up by device name), and lm/plan.py's
               prediction for the same config (`--dry_run --plan_device=<this device>`)
               beside the measurement.
  resnet9      experiments/cifar10_resnet9.py with on-device augmentation: training time from
               the first step to the first eval at >= 94% test accuracy (evaluated each epoch;
               compile and eval time reported apart), and the accuracy after its 24 epochs.
  resnet20, wrn16_4, wrn28_10, seed_cnn
               training images/s (bf16 but the seed CNN, which runs its experiment as is).
  largest_lm   the LM experiment with the most parameters (today gpt2_small again, with its
               byte vocab), FSDP over the one device, scan_layers, and the least remat whose
               compiled step fits the device; planner check beside it too.

Every item uses the real `Trainer` and its jitted `train_step`, fed through the prefetcher
the training loop uses, and reports its compile time, the device's peak_bytes_in_use (none on
CPU) and the child's peak host RSS. The table goes to stdout and, with each item's config
overrides, the device name and the jax/jaxlib/CUDA versions, to the JSON file `--output`.
Language items read the Python standard library's source (byte-level: only throughput
matters there, and it needs no data set). CIFAR items read `--cifar`, a directory `--pack`
wrote (small enough for the 64 MiB a device call carries), or else CIFAR-10 from the TFDS dir
`--data_dir`; `--smoke` without `--cifar` uses random images, so it needs no data at all.
"""

import argparse
import contextlib
import datetime
import glob
import io
import json
import lzma
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# name -> (experiment, estimated wall seconds on an H100 with compiles, on CPU with --smoke).
ITEMS = {
    'gpt2_small': ('experiments/gpt2_small.py', 150, 25),
    'resnet9': ('experiments/cifar10_resnet9.py', 110, 25),
    'resnet20': ('experiments/cifar10_resnet20.py', 45, 20),
    'wrn16_4': ('experiments/cifar10_wrn28_10.py', 50, 25),
    'wrn28_10': ('experiments/cifar10_wrn28_10.py', 70, 25),
    'seed_cnn': ('experiments/cifar10_simple_cnn.py', 30, 15),
    'largest_lm': ('', 100, 20),
}
GPT2_VOCAB = 50257
TARGET_ACCURACY = 0.94
_MIB = 2**20


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--output', '--out', default='',
                 help='where to write the JSON results (default: a new file in the temp dir)')
  p.add_argument('--only', default='', help=f'comma-separated subset of {", ".join(ITEMS)}')
  p.add_argument('--smoke', action='store_true', help='CPU, tiny shapes, few steps')
  p.add_argument('--budget_s', type=float, default=None,
                 help='start no item whose estimate does not fit in what is left of this '
                 '(default 450; with --smoke, 3600: a loaded CI machine still runs every item)')
  p.add_argument('--cifar', default='', help='a directory written by --pack')
  p.add_argument('--data_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'tfds'),
                 help='TFDS dir with cifar10, read when --cifar is not given')
  p.add_argument('--pack', default='', help='write CIFAR-10 from --data_dir into this dir, small '
                 'enough to carry to a device machine, and exit')
  p.add_argument('--item', default='', help=argparse.SUPPRESS)  # A child's one item.
  p.add_argument('--item_out', default='', help=argparse.SUPPRESS)
  p.add_argument('--npz_dir', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --- CIFAR-10 on disk ---------------------------------------------------------------------------
# The TFDS cifar10 is 140 MiB of PNGs; a device call carries 64 MiB. So --pack keeps the test
# split exact (xz of the raw pixels) and stores the training split as one JPEG mosaic at
# quality 95 without chroma subsampling (46.8 dB PSNR against the stored pixels, whose own
# JPEG round trip is ~30 dB from the originals): 57.1 MB in all (2026-11-30). The mosaic's 32-pixel tiles align
# with JPEG's 8x8 blocks, so no image bleeds into another.

_GRID = 100  # Images per mosaic row.


def pack(data_dir: str, out_dir: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lm import images  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  train = images.load_split('cifar10', 'train', data_dir)
  test = images.load_split('cifar10', 'test', data_dir)
  x = train.images_NxHxWxC
  n, h, w, c = x.shape
  rows = -(-n // _GRID)
  grid = np.zeros((rows * _GRID, h, w, c), np.uint8)
  grid[:n] = x
  mosaic = grid.reshape(rows, _GRID, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, c)
  buf = io.BytesIO()
  Image.fromarray(mosaic).save(buf, format='JPEG', quality=95, subsampling=0)
  back = _unmosaic(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), n, h, w)
  mse = np.mean((back.astype(np.float64) - x) ** 2)
  psnr = 10 * np.log10(255.0**2 / mse)
  np.savez(os.path.join(out_dir, 'cifar10.npz'),
           train_jpeg=np.frombuffer(buf.getvalue(), np.uint8), train_label=train.labels_N,
           train_shape=np.array(x.shape), train_psnr=np.array(psnr),
           test_xz=np.frombuffer(lzma.compress(test.images_NxHxWxC.tobytes(), preset=6),
                                 np.uint8),
           test_label=test.labels_N, test_shape=np.array(test.images_NxHxWxC.shape))
  size = os.path.getsize(os.path.join(out_dir, 'cifar10.npz'))
  print(f'wrote {out_dir}/cifar10.npz: {size / 1e6:.1f} MB (train JPEG q95, {psnr:.1f} dB PSNR '
        f'against the stored pixels; test exact)')


def _unmosaic(mosaic, n, h, w):
  rows = mosaic.shape[0] // h
  return mosaic.reshape(rows, h, _GRID, w, -1).transpose(0, 2, 1, 3, 4).reshape(
      rows * _GRID, h, w, -1)[:n]


def _write_npz_splits(args, npz_dir: str) -> str:
  """train.npz and test.npz (lm.images' split files) in npz_dir; returns what they are."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if args.cifar:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with np.load(os.path.join(args.cifar, 'cifar10.npz')) as f:
      n, h, w, _ = f['train_shape']
      train = _unmosaic(np.asarray(Image.open(io.BytesIO(f['train_jpeg'].tobytes()))), n, h, w)
      test = np.frombuffer(lzma.decompress(f['test_xz'].tobytes()), np.uint8).reshape(
          f['test_shape'])
      np.savez(os.path.join(npz_dir, 'train.npz'), image=train, label=f['train_label'])
      np.savez(os.path.join(npz_dir, 'test.npz'), image=test, label=f['test_label'])
      return (f'CIFAR-10 (JPEG stand-in) from {args.cifar}: test split exact, train split '
              f're-encoded JPEG q95 ({float(f["train_psnr"]):.1f} dB PSNR)')
  if args.smoke:  # Random pixels: the smoke checks that every item runs, not what it learns.
    rng = np.random.default_rng(0)
    for split, n in (('train', 256), ('test', 128)):
      np.savez(os.path.join(npz_dir, f'{split}.npz'),
               image=rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
               label=rng.integers(0, 10, (n,), np.int64))
    return 'random 32x32x3 images, 10 classes, 256 train / 128 test (smoke)'
  from lm import images  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    s = images.load_split('cifar10', split, args.data_dir)
    np.savez(os.path.join(npz_dir, f'{split}.npz'), image=s.images_NxHxWxC, label=s.labels_N)
  return f'CIFAR-10 (JPEG stand-in) from {args.data_dir}'


# --- one item, in a child process ---------------------------------------------------------------


def _config(item: str, smoke: bool, npz_dir: str):
  """The item's experiment config with the benchmark's overrides (returned too, to report)."""
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  path = ITEMS[item][0] or _largest_lm()[0]
  config = config_lib.load(os.path.join(REPO_ROOT, path))
  over = {'mesh.data': -1, 'mesh.fsdp': 1, 'mesh.tensor': 1}
  if config.task == 'lm':
    stdlib = os.path.join(sysconfig.get_paths()['stdlib'], '*.py')
    over.update({'data.name': f'files:{stdlib}', 'data.tokenizer': 'byte',
                 'data.heldout_files': 8, 'data.max_bytes': 300_000 if smoke else 4_000_000})
    if item == 'gpt2_small':
      over['model.vocab_size'] = GPT2_VOCAB
    if item == 'largest_lm':
      over.update({'mesh.data': 1, 'mesh.fsdp': -1, 'model.scan_layers': True})
    if smoke:
      over.update({'model.num_layers': 2, 'model.num_heads': 2, 'model.d_model': 64,
                   'model.seq_len': 64, 'train.batch_size': 4, 'model.dtype': 'float32'})
      if item == 'gpt2_small':
        over['model.vocab_size'] = 512
  else:
    over.update({'data.name': '', 'data.data_dir': npz_dir, 'data.augment_on_device': True,
                 'data.eval_split': 'test', 'data.test_split': ''})
    if item == 'wrn16_4':
      over['model.name'] = 'wrn16_4'
    if item != 'seed_cnn':
      over['model.dtype'] = 'bfloat16'
    if smoke:
      # resnet9 trains an epoch of the 256 images; the others time two steps.
      over.update({'train.batch_size': 32 if item == 'resnet9' else 8,
                   'data.eval_batch_size': 128, 'train.epochs': 1, 'optim.warmup_steps': 4})
      if item in ('wrn16_4', 'wrn28_10'):
        over['model.name'] = 'wrn16_4'  # WRN-28-10 is minutes a step on a CPU.
      if item in ('resnet9', 'resnet20'):
        over['model.width'] = 0.25
  for key, value in over.items():
    section, field = key.split('.')
    config[section][field] = value
  return config, path, over


def _largest_lm():
  """(experiment path, parameter count) of the language-model experiment with most params."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib, model  # pylint: disable=g-import-not-at-top
  best = ('', -1)
  for path in sorted(glob.glob(os.path.join(REPO_ROOT, 'experiments', '*.py'))):
    c = config_lib.load(path)
    if c.task != 'lm':
      continue
    cfg = model.TransformerConfig.from_config(c.model, c.model.vocab_size or 256)
    tokens = jax.ShapeDtypeStruct((1, cfg.seq_len), jnp.int32)
    shapes = jax.eval_shape(model.Transformer(cfg).init, jax.random.key(0), tokens)
    count = sum(x.size for x in jax.tree.leaves(shapes['params']))
    if count > best[1]:
      best = (os.path.relpath(path, REPO_ROOT), count)
  return best


def _peak_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def _timed_steps(trainer, state, warmup: int, steps: int):
  """(state, seconds per step, last metrics) over `steps` steps after `warmup`, fed as the
  training loop feeds them: prefetched batches, step N dispatched before N-1 is read."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import prefetch, sharding  # pylint: disable=g-import-not-at-top
  make = lambda s: sharding.to_global(trainer.task.data.train_batch(s), trainer.mesh)
  batches = prefetch.Prefetcher(make, warmup + steps, max(trainer.prefetch, 1))
  metrics = None
  for s in range(warmup):
    state, metrics = trainer.train_step(state, batches.get(s))
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  pending = None
  for s in range(warmup, warmup + steps):
    state, metrics = trainer.train_step(state, batches.get(s))
    if pending is not None:
      jax.device_get(pending['loss'])
    pending = metrics
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / steps, jax.device_get(metrics)


def _build(config, npz_dir: str):
  """A read-only Trainer, its state, and the compile seconds.

  Its workdir, never written, is named under the run's temporary directory (npz_dir's parent),
  which the parent process removes at the end.
  """
  from lm import train  # pylint: disable=g-import-not-at-top
  trainer = train.Trainer(config, os.path.join(os.path.dirname(npz_dir), 'workdir'),
                          read_only=True)
  start = time.perf_counter()
  state = trainer.compile_and_init()
  return trainer, state, time.perf_counter() - start


def _plan_device(kind: str) -> str:
  from lm import metrics  # pylint: disable=g-import-not-at-top
  for name, _ in metrics.PEAK_FLOPS:
    if name.lower() in kind.lower():
      return name
  return ''


def _lm_item(item: str, smoke: bool, npz_dir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from lm import metrics  # pylint: disable=g-import-not-at-top
  config, path, over = _config(item, smoke, npz_dir)
  notes = []
  if item == 'largest_lm':
    over['model.remat'] = _least_remat(config, notes, smoke)
    config.model.remat = over['model.remat']
    notes.append(f'largest LM experiment: {path}')
  trainer, state, compile_s = _build(config, npz_dir)
  warmup, steps = (1, 3) if smoke else (3, 20)
  state, step_s, last = _timed_steps(trainer, state, warmup, steps)
  flops = trainer.task.flops_per_step(None, None)
  peak = metrics.peak_flops_per_device() * jax.device_count()
  out = {'figure': trainer.task.items_per_step / step_s, 'unit': 'tokens/s',
         'step_ms': step_s * 1e3, 'mfu': flops / step_s / peak, 'flops_per_step': flops,
         'params': trainer.param_count, 'compile_s': compile_s, 'loss': float(last['loss']),
         'timed_steps': steps, 'peak_bytes': _peak_bytes(), 'experiment': path,
         'overrides': over, 'notes': notes}
  out['plan'] = _plan(config, jax.devices()[0].device_kind)
  return out


def _least_remat(config, notes: list, smoke: bool) -> str:
  """The first remat policy whose compiled step fits in 90% of the device's memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import train  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  if limit is None and smoke:  # A CPU keeps no limit; a made-up one still runs the search.
    limit = 2**40
    notes.append('smoke: a made-up 1 TiB memory limit')
  elif limit is None:
    notes.append('remat none: this device reports no memory limit')
    return 'none'
  for policy in ('none', 'dots', 'full'):
    config.model.remat = policy
    trainer = train.Trainer(config, '/nonexistent-accelerator', read_only=True,
                            shapes_only=True)  # Compiles only: the data's shapes suffice.
    m = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile(
        ).memory_analysis()
    need = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes -
            m.alias_size_in_bytes)
    notes.append(f'remat {policy}: the compiled step needs {need / 2**30:.1f} of '
                 f'{limit / 2**30:.1f} GiB')
    if need < 0.9 * limit:
      return policy
  return 'full'


def _plan(config, device_kind: str) -> dict:
  """lm/plan.py's prediction for this config on this device (its stdout kept out of ours)."""
  from lm import plan  # pylint: disable=g-import-not-at-top
  target = _plan_device(device_kind)
  with contextlib.redirect_stdout(io.StringIO()):
    p = plan.print_plan(config, target)
  memory = (p['param_bytes_per_device'] + p['opt_bytes_per_device'] +
            p['temp_bytes_per_device'])
  return {'plan_device': target or 'this device (measured peak)',
          'assumed_mfu': p['assumed_mfu'], 'step_ms': p['step_s'] * 1e3,
          'memory_bytes': memory}


def _accuracy(trainer, state, batches) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  params = state.ema_params if state.ema_params is not None else state.params
  correct = count = 0.0
  for b in batches:
    sums = jax.device_get(trainer.eval_step(params, state.model_state, b))
    correct += float(sums['correct'])
    count += float(sums['count'])
  return correct / max(count, 1.0)


def _resnet9_item(smoke: bool, npz_dir: str) -> dict:
  """Time to 94% test accuracy: training time only, the clock stopped around each eval."""
  import jax  # pylint: disable=g-import-not-at-top
  from lm import prefetch, sharding  # pylint: disable=g-import-not-at-top
  config, path, over = _config('resnet9', smoke, npz_dir)
  trainer, state, compile_s = _build(config, npz_dir)
  mesh = trainer.mesh
  evals = [sharding.to_global(b, mesh) for b in trainer.task.eval_batches('test')]
  start = time.perf_counter()
  initial = _accuracy(trainer, state, evals)  # Compiles the eval step outside the clock.
  eval_compile_s = time.perf_counter() - start
  per_epoch = trainer.task.data.steps_per_epoch
  every = max(1, per_epoch // 2) if smoke else per_epoch
  make = lambda s: sharding.to_global(trainer.task.data.train_batch(s), mesh)
  batches = prefetch.Prefetcher(make, trainer.steps, max(trainer.prefetch, 1))
  curve, reached_s, train_s, eval_s = [], None, 0.0, 0.0
  clock = time.perf_counter()
  for step in range(trainer.steps):
    state, metrics = trainer.train_step(state, batches.get(step))
    done = step + 1
    if done % every and done != trainer.steps:
      continue
    jax.block_until_ready((state, metrics))
    train_s += time.perf_counter() - clock
    t = time.perf_counter()
    accuracy = _accuracy(trainer, state, evals)
    eval_s += time.perf_counter() - t
    curve.append((done, round(train_s, 3), round(accuracy, 4)))
    if reached_s is None and accuracy >= TARGET_ACCURACY:
      reached_s = train_s
    clock = time.perf_counter()
  return {'figure': reached_s, 'unit': f's to {TARGET_ACCURACY:.0%}',
          'final_accuracy': curve[-1][2], 'train_s': train_s, 'eval_s': eval_s,
          'compile_s': compile_s, 'eval_compile_s': eval_compile_s, 'steps': trainer.steps,
          'epochs': trainer.steps / per_epoch, 'initial_accuracy': initial,
          'images_per_s': trainer.steps * config.train.batch_size / train_s,
          'curve': curve, 'peak_bytes': _peak_bytes(), 'experiment': path, 'overrides': over,
          'notes': [] if reached_s is not None else [f'{TARGET_ACCURACY:.0%} not reached']}


def _images_item(item: str, smoke: bool, npz_dir: str) -> dict:
  config, path, over = _config(item, smoke, npz_dir)
  trainer, state, compile_s = _build(config, npz_dir)
  warmup, steps = (1, 2) if smoke else {'seed_cnn': (20, 300)}.get(item, (5, 30))
  state, step_s, last = _timed_steps(trainer, state, warmup, steps)
  return {'figure': config.train.batch_size / step_s, 'unit': 'images/s',
          'step_ms': step_s * 1e3, 'params': trainer.param_count, 'compile_s': compile_s,
          'loss': float(last['loss']), 'timed_steps': steps, 'peak_bytes': _peak_bytes(),
          'experiment': path, 'overrides': over, 'notes': []}


def _device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  info = {'device': device.device_kind, 'platform': device.platform,
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  try:
    info['platform_version'] = device.client.platform_version
  except AttributeError:
    pass
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    if cuda_versions is not None:
      info['cuda_runtime'] = cuda_versions.cuda_runtime_get_version()
      info['cudnn'] = cuda_versions.cudnn_get_version()
  except Exception:  # pylint: disable=broad-except  Private API; the versions are a courtesy.
    pass
  return info


def run_item(args) -> None:
  """A child: its items in turn (one on a device; all of them with --smoke), each result or
  error appended to the JSON list in --item_out as soon as it is known."""
  from lm import runtime  # pylint: disable=g-import-not-at-top
  runtime.set_gpu_xla_flags()
  runtime.enable_compilation_cache()
  results = []
  for name in args.item.split(','):
    start, cpu = time.perf_counter(), _cpu_s()
    result = {'item': name}
    try:
      result.update(_device_info())
      if name == 'probe':
        pass
      elif name in ('gpt2_small', 'largest_lm'):
        result.update(_lm_item(name, args.smoke, args.npz_dir))
      elif name == 'resnet9':
        result.update(_resnet9_item(args.smoke, args.npz_dir))
      else:
        result.update(_images_item(name, args.smoke, args.npz_dir))
      result['ok'] = True
    except Exception as e:  # pylint: disable=broad-except  Reported; the next item still runs.
      result.update(ok=False, error=f'{type(e).__name__}: {e}'[:2000],
                    traceback=traceback.format_exc()[-4000:])
    # The process's peak so far: the item's own when it has the process to itself.
    result.update(peak_host_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  host_cpu_s=_cpu_s() - cpu, wall_s=time.perf_counter() - start)
    results.append(result)
    with open(args.item_out, 'w') as f:
      json.dump(results, f, default=float)


def _cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


# --- the driver ---------------------------------------------------------------------------------


def _child(args, names: list[str], npz_dir: str, env: dict, timeout: float) -> list[dict]:
  """The items' results from a child process; those it did not finish, failed with its exit."""
  with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
    out = f.name
  cmd = [sys.executable, os.path.abspath(__file__), f'--item={",".join(names)}',
         f'--item_out={out}', f'--npz_dir={npz_dir}'] + (['--smoke'] if args.smoke else [])
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
    code = proc.returncode
  except subprocess.TimeoutExpired as e:
    tail, code = f'timed out after {timeout:.0f} s: {str(e.stderr or "")[-2000:]}', -1
  results = []
  if os.path.getsize(out):
    with open(out) as f:
      results = json.load(f)
  os.remove(out)
  done = {r['item'] for r in results}
  results += [{'item': n, 'ok': False, 'error': f'exit code {code}: {tail}'}
              for n in names if n not in done]
  if len(names) == 1:  # Its own process: its wall includes the interpreter and JAX start-up.
    results[0]['wall_s'] = time.perf_counter() - start
  return results


def _fmt_bytes(b) -> str:
  return '-' if b is None else f'{b / 2**30:.2f} GiB'


def _memory(r: dict) -> str:
  """The device's peak, or where the device keeps no count (CPU), the process's peak RSS."""
  if r.get('peak_bytes') is not None:
    return _fmt_bytes(r['peak_bytes'])
  rss = r.get('peak_host_rss_bytes')
  return '-' if rss is None else f'host RSS {rss / _MIB:,.0f} MiB'


def table(results: list[dict], skipped: list[str]) -> str:
  rows = ['| item | figure | step | MFU | compile s | item wall s | peak memory | '
          'config | notes |', '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    if not r.get('ok'):
      rows.append(f'| {r["item"]} | failed | | | | {r.get("wall_s", 0):.0f} | | | '
                  f'{r.get("error", "")[:200].replace("|", "/").splitlines()[0]} |')
      continue
    fig = r.get('figure')
    figure = ('not reached' if fig is None else f'{fig:,.1f} {r["unit"]}' if fig < 100 else
              f'{fig:,.0f} {r["unit"]}')
    extra = []
    if 'final_accuracy' in r:
      extra.append(f'{r["final_accuracy"]:.2%} after {r["epochs"]:.0f} epochs '
                   f'({r["train_s"]:.1f} s training, {r["images_per_s"]:,.0f} img/s)')
    over = ', '.join(f'{k}={v}' for k, v in r.get('overrides', {}).items()
                     if not k.startswith(('data.name', 'data.data_dir', 'mesh.')))
    mfu = f'{r["mfu"]:.1%}' if 'mfu' in r else ''
    step = f'{r["step_ms"]:.1f} ms' if 'step_ms' in r else ''
    rows.append(f'| {r["item"]} | {figure} | {step} | {mfu} | {r.get("compile_s", 0):.1f} | '
                f'{r.get("wall_s", 0):.0f} | {_memory(r)} | '
                f'{r.get("experiment", "")} {over} | '
                f'{"; ".join(extra + r.get("notes", []))} |')
  for name in skipped:
    rows.append(f'| {name} | skipped: over the wall budget | | | | | | | |')
  for r in results:
    if r.get('ok') and 'plan' in r:
      p = r['plan']
      rows += ['', f'Planner check ({r["item"]}, `--dry_run --plan_device={p["plan_device"]}`, '
               f'assumed MFU {p["assumed_mfu"]:.0%}):', '',
               '| | predicted | measured |', '|---|---|---|',
               f'| step time | {p["step_ms"]:.1f} ms | {r["step_ms"]:.1f} ms |',
               f'| device memory | {_fmt_bytes(p["memory_bytes"])} (params + optimizer + '
               f'compiled temporaries) | {_fmt_bytes(r.get("peak_bytes"))} (peak in use) |']
  return '\n'.join(rows)


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 3600.0 if args.smoke else 450.0
  if args.item:
    run_item(args)
    return 0
  if args.pack:
    pack(args.data_dir, args.pack)
    return 0
  start = time.perf_counter()
  names = [n.strip() for n in args.only.split(',') if n.strip()] or list(ITEMS)
  unknown = [n for n in names if n not in ITEMS]
  if unknown:
    print(f'error: unknown item(s) {unknown}; choose from {", ".join(ITEMS)}', file=sys.stderr)
    return 2
  # The CIFAR splits (176 MiB of uint8 images on a GPU run), the compilation cache and the
  # items' workdirs live here for the run only; the JSON is written outside it.
  work = tempfile.mkdtemp(prefix='accelerator_')
  try:
    return _measure(args, names, work, start)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _measure(args, names: list[str], work: str, start: float) -> int:
  """Runs the items in child processes, prints the table, writes the JSON; the exit code."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO_ROOT, env.get('PYTHONPATH')]))
  # A fresh cache: compile times are first compiles; the planner's recompile of the same
  # step, in the same process, is then a cache hit.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(work, 'jax_cache'))
  if args.smoke:
    # LLVM's -O0: a third less compile, and CPU step speed means nothing here.
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1 '
               '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  npz_dir = os.path.join(work, 'cifar10')
  os.makedirs(npz_dir)
  probe = _child(args, ['probe'], npz_dir, env, timeout=300)[0]
  if not probe.get('ok'):
    print(f'error: the device probe failed: {probe.get("error")}', file=sys.stderr)
    return 1
  print(f'device: {probe["device"]} x {probe["device_count"]}; jax {probe["jax"]}, jaxlib '
        f'{probe["jaxlib"]}, {probe.get("platform_version", "")}; XLA_FLAGS='
        f'"{probe["xla_flags"]}"', flush=True)
  data_note = ''
  if any(ITEMS[n][0].startswith('experiments/cifar') for n in names):
    data_note = _write_npz_splits(args, npz_dir)
    print(f'data: {data_note} ({time.perf_counter() - start:.0f} s so far)', flush=True)
  results, skipped = [], []
  # One process per item on a device: its own memory peak, and a crash costs one item. With
  # --smoke one process runs them all: seven fewer interpreter and JAX start-ups on a CPU.
  for group in [names] if args.smoke else [[n] for n in names]:
    estimate = sum(ITEMS[n][2 if args.smoke else 1] for n in group)
    left = args.budget_s - (time.perf_counter() - start)
    if estimate > left:
      skipped += group
      print(f'{", ".join(group)}: skipped, its estimate of {estimate} s is over the {left:.0f} s '
            'left', flush=True)
      continue
    # Past the budget an item is stopped (and reported as failed): the run's wall is bounded.
    for r in _child(args, group, npz_dir, env, timeout=left + 20):
      results.append(r)
      fig = r.get('figure')
      print(f'{r["item"]}: ' + (f'{fig} {r.get("unit", "")}' if r.get('ok') else
                                f'FAILED {r.get("error", "")[:300]}') +
            f' ({r.get("wall_s", 0):.0f} s)', flush=True)
  wall = time.perf_counter() - start
  info = {k: probe.get(k) for k in ('device', 'platform', 'device_count', 'jax', 'jaxlib',
                                    'platform_version', 'cuda_runtime', 'cudnn', 'xla_flags')}
  report = {'date': datetime.datetime.now().isoformat(timespec='seconds'), **info,
            'smoke': args.smoke, 'budget_s': args.budget_s, 'wall_s': wall, 'data': data_note,
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'items': [{**info, **r} for r in results], 'skipped': skipped,
            'failed': [r['item'] for r in results if not r.get('ok')]}
  if args.output:
    out = args.output
  else:
    fd, out = tempfile.mkstemp(prefix='accelerator_', suffix='.json')
    os.close(fd)
  with open(out, 'w') as f:
    json.dump(report, f, indent=1, default=float)
  print(f'\n{report["date"]}, {info["device"]} ({info["platform"]}), jax {info["jax"]}, '
        f'jaxlib {info["jaxlib"]}, {info.get("platform_version") or ""}, whole run {wall:.0f} s'
        f'{" (smoke: tiny shapes on CPU)" if args.smoke else ""}\n')
  print(table(results, skipped))
  print(f'\nJSON: {out}')
  return 1 if report['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
