"""Several `lm.main` processes on this machine, as if each were a host of a cluster.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/shakespeare_char.py --workdir=/tmp/mp --config.mesh.fsdp=8

On CPU each process gets `devices_per_process` fake devices (XLA_FLAGS); on GPUs it gets that
many GPUs (CUDA_VISIBLE_DEVICES). Output is prefixed `[p0]`, `[p1]`, ...; if one process
fails or dies, the others (which cannot go on without it) are killed within --grace_s, and
the launcher exits with the failing code and one line naming the checkpoint the same command
resumes from. SIGINT/SIGTERM are forwarded, so the trainer saves a checkpoint before exiting.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys

from launch import _cli
from launch import _procs


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, trainer_args = _cli.split(argv)
  p = argparse.ArgumentParser(prog='python -m launch.local', description=__doc__.split('\n')[0],
                              usage='%(prog)s [flags] -- --config=... --workdir=... [...]')
  p.add_argument('--num_processes', type=int, default=1, help='Processes to start.')
  p.add_argument('--devices_per_process', type=int, default=1,
                 help='CPU: fake devices per process. GPU: GPUs per process.')
  p.add_argument('--platform', choices=('auto', 'cpu', 'gpu'), default='auto',
                 help='auto: gpu when nvidia-smi lists GPUs, else cpu.')
  p.add_argument('--coordinator_port', type=int, default=0, help='0: pick a free port.')
  p.add_argument('--python', default=sys.executable, help='Interpreter for the processes.')
  p.add_argument('--grace_s', type=float, default=3.0,
                 help='After a process fails, seconds the others get to exit on their own '
                 'before SIGKILL (they cannot save without it).')
  args = p.parse_args(own)
  if args.num_processes < 1 or args.devices_per_process < 1:
    raise _cli.UsageError('--num_processes and --devices_per_process must be at least 1')
  _cli.require_trainer_flags(trainer_args, 'local')
  return args, trainer_args


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def visible_gpus() -> list[str]:
  """GPU ids this launcher may hand out: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list."""
  if os.environ.get('CUDA_VISIBLE_DEVICES'):
    return [g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g]
  if not shutil.which('nvidia-smi'):
    return []
  out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False)
  return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith('GPU')]


def device_env(platform: str, slot: int, count: int, gpus: list[str]) -> dict:
  """Environment that gives one process its own `count` devices (slot = its index)."""
  if platform == 'gpu':
    share = gpus[slot * count:(slot + 1) * count]
    if len(share) < count:
      raise _cli.UsageError(f'asked for {count} GPUs for slot {slot} but only {len(gpus)} '
                            f'are visible ({",".join(gpus) or "none"})')
    return {'CUDA_VISIBLE_DEVICES': ','.join(share)}
  # Replace, not append: an inherited device count (e.g. from a test runner) would win.
  xla = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
               os.environ.get('XLA_FLAGS', '')).strip()
  return {'XLA_FLAGS': f'{xla} --xla_force_host_platform_device_count={count}'.strip(),
          'JAX_PLATFORMS': 'cpu'}


def resolve_platform(platform: str) -> str:
  if platform == 'auto':
    return 'gpu' if visible_gpus() else 'cpu'
  return platform


def process_envs(num: int, devices: int, platform: str, port: int) -> list[dict]:
  gpus = visible_gpus() if platform == 'gpu' else []
  envs = []
  for i in range(num):
    env = dict(os.environ, PYTHONUNBUFFERED='1', LM_COORDINATOR=f'127.0.0.1:{port}',
               LM_NUM_PROCESSES=str(num), LM_PROCESS_ID=str(i))
    env.update(device_env(platform, i, devices, gpus))
    envs.append(env)
  return envs


def resume_advice(workdir: str, code: int) -> str:
  """What to do after a process failed with `code`: where the same command resumes from."""
  if code in (2, 3):  # lm.main's bad input and divergence: its own error line says what to do.
    return 'Its error is above'
  try:
    from lm import checkpoint  # pylint: disable=g-import-not-at-top
    step = checkpoint.latest_step(workdir)  # Lists the directory; opens nothing for writing.
  except Exception:  # pylint: disable=broad-except
    # The advice must not hide the failure; without the step it is still right.
    return 'Run the same command to resume from the latest checkpoint'
  if step is None:
    return f'No checkpoint in {workdir} yet: the same command starts again'
  return (f'Run the same command to resume from checkpoint {step} '
          f'({os.path.join(os.path.abspath(workdir), "checkpoints", str(step))})')


def main(argv: list[str]) -> int:
  try:
    args, trainer_args = parse(argv)
    platform = resolve_platform(args.platform)
    envs = process_envs(args.num_processes, args.devices_per_process, platform,
                        args.coordinator_port or free_port())
  except _cli.UsageError as e:
    _cli.fail(str(e))
  _, workdir = _cli.require_trainer_flags(trainer_args, 'local')
  cmd = [args.python, '-m', 'lm.main', *trainer_args]
  n = args.num_processes
  return _procs.run_group([cmd] * n, envs, [f'[p{i}] ' for i in range(n)], args.grace_s,
                          advice=lambda code: resume_advice(workdir, code))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
