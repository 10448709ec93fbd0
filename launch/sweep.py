"""Runs an experiment file's `sweep()`: one `lm.main` workdir per trial under --sweep_dir.

  python -m launch.sweep --config=experiments/shakespeare_char.py --sweep_dir=/tmp/sw \
      --parallel=2 -- --config.train.steps=200
  python -m launch.sweep --config=experiments/quickstart.py --sweep_dir=/tmp/sw \
      --grid optim.lr=1e-3,3e-3 --grid seed=0,1     # any experiment: a grid of its fields
  python -m launch.sweep --config=... --sweep_dir=/shared/sw --backend=slurm --submit
  python -m launch.sweep summarize /tmp/sw [--metric=eval/loss] [--mode=min]

Trials whose workdir has DONE are skipped and half-finished ones resume, so a sweep that was
stopped (or killed) runs again with the same command, losing and repeating nothing.
Locally, `--parallel` trials run at once, each on its own devices, with output in
`<trial>/train.log`. On Slurm the sweep is one job array; task i runs trial i.
"""

import argparse
import json
import os
import shutil
import sys
import time

from launch import _cli
from launch import _procs
from launch import _slurm_jobs
from launch import _trials
from launch import local
from launch import slurm


def parse_run(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, extra = _cli.split(argv)
  p = argparse.ArgumentParser(
      prog='python -m launch.sweep', description=__doc__.split('\n')[0],
      usage='%(prog)s --config=FILE --sweep_dir=DIR [--grid FIELD=V1,V2 ...] [flags] '
            '[-- args for every trial]\n'
            '       %(prog)s summarize DIR [--metric=eval/loss] [--mode=min]')
  p.add_argument('--config', required=True, help='Experiment file with get_config() and sweep().')
  p.add_argument('--sweep_dir', required=True, help='One workdir per trial goes here.')
  p.add_argument('--grid', action='append', default=[], metavar='FIELD=V1,V2',
                 help="An axis to sweep instead of the file's sweep(); repeat it for the product "
                      'of several. Values take the type of the config field (1e3 is an int '
                      'for train.steps).')
  p.add_argument('--backend', choices=('local', 'slurm'), default='local')
  p.add_argument('--parallel', type=int, default=0,
                 help='Trials at once (local default 1; slurm default: no limit).')
  p.add_argument('--devices_per_trial', type=int, default=1,
                 help='local: CPU fake devices, or GPUs, for each trial.')
  p.add_argument('--platform', choices=('auto', 'cpu', 'gpu'), default='auto',
                 help='local: auto picks gpu when nvidia-smi lists GPUs.')
  p.add_argument('--pin_cpus', action='store_true',
                 help='local: pin each trial to its share of this machine\'s cores (taskset).')
  mode = p.add_mutually_exclusive_group()
  mode.add_argument('--dry_run', action='store_true',
                    help='Print the trials (and the sbatch script) without running anything.')
  mode.add_argument('--submit', action='store_true', help='slurm: submit the job array.')
  p.add_argument('--wait', action='store_true', help='slurm: follow the array to its end.')
  slurm.add_job_flags(p)
  args = p.parse_args(own)
  if args.parallel < 0 or args.devices_per_trial < 1:
    raise _cli.UsageError('--parallel must be >= 0 and --devices_per_trial >= 1')
  if args.backend == 'local' and (args.submit or args.wait):
    raise _cli.UsageError('--submit and --wait are for --backend=slurm')
  if args.backend == 'slurm':
    slurm.check(args)
  return args, extra


# --- local backend -------------------------------------------------------------------------


def _cpu_shares(parallel: int) -> list[list[int]]:
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // parallel)
  return [cores[(i * per) % len(cores):][:per] for i in range(parallel)]


def _start(trial: dict, slot: int, args, platform: str, gpus: list[str]) -> _procs.Child:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  for key in ('LM_COORDINATOR', 'LM_NUM_PROCESSES', 'LM_PROCESS_ID'):
    env.pop(key, None)  # Each trial is a job of its own, never part of an outer one.
  env.update(local.device_env(platform, slot, args.devices_per_trial, gpus))
  cmd = [args.python, '-m', 'lm.main', *trial['args']]
  if args.pin_cpus and shutil.which('taskset'):
    cores = _cpu_shares(args.parallel or 1)[slot]
    cmd = ['taskset', '-c', ','.join(map(str, cores)), *cmd]
  os.makedirs(trial['workdir'], exist_ok=True)
  log = os.path.join(trial['workdir'], 'train.log')
  return _procs.Child(cmd, env, log_path=log)


def _record(sweep_dir: str, trial: dict, code: int, stopped: bool, seconds: float):
  """Appends to attempts.jsonl, which summarize reads to tell failed trials from stopped."""
  with open(os.path.join(sweep_dir, 'attempts.jsonl'), 'a') as f:
    f.write(json.dumps({'index': trial['index'], 'name': trial['name'], 'exit_code': code,
                        'done': _trials.is_done(trial), 'stopped': stopped,
                        'seconds': round(seconds, 1),
                        'time': time.strftime('%Y-%m-%dT%H:%M:%S')}) + '\n')


def _tail(path: str, lines: int = 5) -> str:
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-lines:])


def run_local(spec: dict, sweep_dir: str, args) -> int:
  parallel = args.parallel or 1
  platform = local.resolve_platform(args.platform)
  gpus = local.visible_gpus() if platform == 'gpu' else []
  queue = []
  for trial in spec['trials']:
    if _trials.is_done(trial):
      print(f'skip    {trial["name"]} (DONE)', flush=True)
    else:
      queue.append(trial)
  running = {}  # slot -> (trial, child, start time)
  failed = []
  with _procs.forward_signals(lambda: [c for _, c, _ in running.values()]) as received:
    while running or (queue and not received):
      for slot in range(parallel):
        if slot not in running and queue and not received:
          trial = queue.pop(0)
          running[slot] = (trial, _start(trial, slot, args, platform, gpus), time.time())
          print(f'start   {trial["name"]} (slot {slot})', flush=True)
      for slot, (trial, child, t0) in list(running.items()):
        if child.poll() is None:
          continue
        code = child.finish()
        del running[slot]
        done = _trials.is_done(trial)
        # A trial we signalled may die before the trainer installs its handler: not a failure.
        stopped = not done and (code == 0 or bool(received))
        _record(sweep_dir, trial, code, stopped, time.time() - t0)
        print(f'{"done" if done else "stopped" if stopped else "FAILED":7s} {trial["name"]} '
              f'(exit {code}, {time.time() - t0:.0f}s)', flush=True)
        if not done and not stopped:
          failed.append(trial['name'])
          print(_tail(os.path.join(trial['workdir'], 'train.log')), end='', flush=True)
      time.sleep(0.2)
  left = [t['name'] for t in spec['trials'] if not _trials.is_done(t)]
  print(f'{len(spec["trials"]) - len(left)}/{len(spec["trials"])} trials done'
        + (f'; failed: {", ".join(failed)}' if failed else '')
        + ('; run the same command to continue' if left and not failed else ''), flush=True)
  return 1 if failed else (130 if received else 0)


# --- Slurm backend -------------------------------------------------------------------------


def index_ranges(indices: list[int]) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8', the form sbatch --array takes."""
  parts, start = [], None
  for i, x in enumerate(indices):
    if start is None:
      start = x
    if i + 1 == len(indices) or indices[i + 1] != x + 1:
      parts.append(f'{start}' if start == x else f'{start}-{x}')
      start = None
  return ','.join(parts)


def render_array(spec: dict, sweep_dir: str, args) -> str:
  todo = [t['index'] for t in spec['trials'] if not _trials.is_done(t)]
  array = index_ranges(todo) + (f'%{args.parallel}' if args.parallel else '')
  command = [args.python, '-m', 'launch.sweep', 'trial', os.path.abspath(sweep_dir)]
  log = os.path.join(os.path.abspath(sweep_dir), 'slurm-%A_%a.out')
  return slurm.render(args, command, log, array=array,
                      workdirs=tuple(t['workdir'] for t in spec['trials']))


def run_slurm(spec: dict, sweep_dir: str, args) -> int:
  if all(_trials.is_done(t) for t in spec['trials']):
    print(f'all {len(spec["trials"])} trials are DONE; nothing to submit')
    return 0
  script = render_array(spec, sweep_dir, args)
  if not args.submit:
    print(script, end='')
    return 0
  _trials.write(sweep_dir, spec)
  path = os.path.join(sweep_dir, 'sweep.sbatch')
  with open(path, 'w') as f:
    f.write(script)
  job_id = _slurm_jobs.submit(path)
  print(f'submitted job array {job_id}: {path}\nlogs: {sweep_dir}/slurm-{job_id}_<index>.out',
        flush=True)
  return _slurm_jobs.wait(job_id) if args.wait else 0


def run_trial(argv: list[str]):
  """`launch.sweep trial <sweep_dir> [index]`: what each array task runs; becomes lm.main."""
  if not argv:
    raise _cli.UsageError('usage: python -m launch.sweep trial <sweep_dir> [index]')
  spec = _trials.read(argv[0])
  index = int(argv[1] if len(argv) > 1 else os.environ.get('SLURM_ARRAY_TASK_ID', -1))
  if not 0 <= index < len(spec['trials']):
    raise _cli.UsageError(f'trial index {index} is not in 0..{len(spec["trials"]) - 1}')
  trial = spec['trials'][index]
  if _trials.is_done(trial):
    print(f'{trial["name"]} is DONE; nothing to run', flush=True)
    sys.exit(0)
  print(f'trial {index}: {trial["name"]}', flush=True)
  # exec, not a child: Slurm's signals then reach the trainer directly.
  os.execv(sys.executable, [sys.executable, '-m', 'lm.main', *trial['args']])


def main(argv: list[str]) -> int:
  try:
    if argv[:1] == ['summarize']:
      from launch import _summary  # pylint: disable=g-import-not-at-top
      return _summary.main(argv[1:])
    if argv[:1] == ['trial']:
      return run_trial(argv[1:])
    args, extra = parse_run(argv)
    spec = _trials.expand(args.config, args.sweep_dir, extra, args.grid)
    if args.dry_run and args.backend == 'local':
      print(json.dumps(spec, indent=1))
      return 0
    if args.backend == 'slurm':
      return run_slurm(spec, args.sweep_dir, args)
    _trials.write(args.sweep_dir, spec)
    print(f'{len(spec["trials"])} trials in {args.sweep_dir}/{_trials.SPEC_FILE}', flush=True)
    return run_local(spec, args.sweep_dir, args)
  except _cli.UsageError as e:
    _cli.fail(str(e))
  except _slurm_jobs.SlurmError as e:
    _cli.fail(str(e), code=1)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
