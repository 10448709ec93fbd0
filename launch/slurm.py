"""`lm.main` as a Slurm batch job: render the sbatch script, submit it, follow it.

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --dry_run -- \
      --config=experiments/gpt2_small.py --workdir=/shared/run       # prints the script
  python -m launch.slurm --nodes=1 --ntasks_per_node=2 --submit --wait -- \
      --config=experiments/shakespeare_char.py --workdir=/shared/sh   # submits and follows

One Slurm task per process (by default one per GPU); `srun` starts them and lm.main finds
its peers from the Slurm environment. Jobs are requeueable: on preemption Slurm requeues
them, and near the time limit the script has the trainer save a checkpoint and requeues
itself; either way the job restarts under the same id and workdir and resumes.
"""

import argparse
import os
import shlex
import sys

from launch import _cli
from launch import _slurm_jobs

_TRAP = """\
# Near the time limit Slurm sends USR1 to this script (--signal above): ask the trainer to
# save a checkpoint and stop, then requeue, so the job resumes from it under the same id.
stopping=0
on_time_limit() {{
  stopping=1
  echo "time limit near: checkpointing, then requeueing"
  scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap on_time_limit USR1

echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST at $(date)"
{srun} &
step=$!
# `wait` also returns when a trap runs; wait again until the step itself has ended.
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
wait "$step"
status=$?
if [[ $stopping == 1 && ! -e $workdir/DONE ]]; then
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit $status
"""


def add_job_flags(p: argparse.ArgumentParser):
  """The flags that shape a job; launch.sweep's Slurm backend takes them too."""
  g = p.add_argument_group('Slurm job')
  g.add_argument('--nodes', type=int, default=1, help='Nodes (hosts).')
  g.add_argument('--gpus_per_node', type=int, default=0, help='GPUs per node (0: CPU job).')
  g.add_argument('--ntasks_per_node', type=int, default=0,
                 help='Processes per node (0: one per GPU, or 1 without GPUs).')
  g.add_argument('--cpus_per_task', type=int, default=0, help='CPUs per process (0: default).')
  g.add_argument('--time', default='', help='Time limit, e.g. 24:00:00 (empty: partition '
                 'default).')
  g.add_argument('--partition', default='', help='Partition (empty: cluster default).')
  g.add_argument('--account', default='', help='Account to charge (empty: your default).')
  g.add_argument('--job_name', default='lm', help='Job name in squeue.')
  g.add_argument('--sbatch', action='append', default=[], metavar='OPTION',
                 help='Extra #SBATCH option, e.g. --sbatch=--constraint=h100 (repeatable).')
  g.add_argument('--env', action='append', default=[], metavar='KEY=VAL',
                 help='Environment variable for the job (repeatable).')
  g.add_argument('--signal_s', type=int, default=180,
                 help='Seconds before the time limit to checkpoint and requeue.')
  g.add_argument('--python', default=sys.executable, help='Interpreter on the nodes (default: '
                 'this one, e.g. the venv on a shared filesystem).')


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, trainer_args = _cli.split(argv)
  p = argparse.ArgumentParser(prog='python -m launch.slurm', description=__doc__.split('\n')[0],
                              usage='%(prog)s [flags] -- --config=... --workdir=... [...]')
  add_job_flags(p)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument('--dry_run', action='store_true', help='Print the sbatch script (default).')
  mode.add_argument('--submit', action='store_true', help='Write the script and sbatch it.')
  p.add_argument('--wait', action='store_true', help='With --submit: follow the job to its '
                 'end, printing its log, and exit with its exit code.')
  args = p.parse_args(own)
  if args.wait and not args.submit:
    raise _cli.UsageError('--wait follows a submitted job; add --submit')
  _cli.require_trainer_flags(trainer_args, 'slurm')
  check(args)
  return args, trainer_args


def check(args: argparse.Namespace):
  if args.nodes < 1:
    raise _cli.UsageError(f'--nodes={args.nodes} must be at least 1')
  for kv in args.env:
    key = kv.split('=', 1)[0]
    if '=' not in kv or not key.isidentifier():
      raise _cli.UsageError(f'--env={kv!r} must look like KEY=VALUE')
  if args.gpus_per_node % tasks_per_node(args):
    raise _cli.UsageError(f'--gpus_per_node={args.gpus_per_node} must be a multiple of '
                          f'--ntasks_per_node={tasks_per_node(args)}')


def tasks_per_node(args) -> int:
  return args.ntasks_per_node or args.gpus_per_node or 1


def sbatch_lines(args, log_path: str, array: str = '') -> list[str]:
  opts = [f'--job-name={args.job_name}', f'--nodes={args.nodes}',
          f'--ntasks-per-node={tasks_per_node(args)}']
  if args.gpus_per_node:
    opts.append(f'--gpus-per-task={args.gpus_per_node // tasks_per_node(args)}')
  if args.cpus_per_task:
    opts.append(f'--cpus-per-task={args.cpus_per_task}')
  for flag in ('time', 'partition', 'account'):
    if getattr(args, flag):
      opts.append(f'--{flag}={getattr(args, flag)}')
  if array:
    opts.append(f'--array={array}')
  # Appending keeps the log of every attempt when a requeued job starts again.
  opts += [f'--chdir={os.getcwd()}', f'--output={log_path}', '--open-mode=append',
           '--requeue', f'--signal=B:USR1@{args.signal_s}', *args.sbatch]
  return [f'#SBATCH {o}' for o in opts]


def srun_line(args, command: list[str]) -> str:
  srun = ['srun', '--kill-on-bad-exit=1']
  if args.cpus_per_task:  # srun does not inherit it from sbatch in every Slurm version.
    srun.append(f'--cpus-per-task={args.cpus_per_task}')
  return shlex.join(srun + command)


def render(args, command: list[str], log_path: str, workdir: str = '', array: str = '',
           workdirs: tuple[str, ...] = ()) -> str:
  """The sbatch script. With `array`, task i runs in `workdirs[i]`."""
  lines = ['#!/bin/bash', *sbatch_lines(args, log_path, array),
           '# Written by launch.slurm. Run `sbatch <this file>` again to continue the run.', '',
           'export PYTHONUNBUFFERED=1']
  lines += [f'export {k}={shlex.quote(v)}' for k, v in (kv.split('=', 1) for kv in args.env)]
  if array:
    lines.append(f'workdirs=({" ".join(shlex.quote(os.path.abspath(w)) for w in workdirs)})')
    lines.append('workdir=${workdirs[$SLURM_ARRAY_TASK_ID]}')
  else:
    lines.append(f'workdir={shlex.quote(os.path.abspath(workdir))}')
  lines.append('')
  return '\n'.join(lines) + '\n' + _TRAP.format(srun=srun_line(args, command))


def script_path(workdir: str) -> str:
  """The script lives next to the workdir: `<workdir>.sbatch`."""
  return os.path.normpath(os.path.abspath(workdir)) + '.sbatch'


def main(argv: list[str]) -> int:
  try:
    args, trainer_args = parse(argv)
  except _cli.UsageError as e:
    _cli.fail(str(e))
  _, workdir = _cli.require_trainer_flags(trainer_args, 'slurm')
  log_path = os.path.join(os.path.abspath(workdir), 'slurm-%j.out')
  script = render(args, [args.python, '-m', 'lm.main', *trainer_args], log_path, workdir)
  if not args.submit:
    print(script, end='')
    return 0
  # Slurm opens the log before the job starts; a missing directory would lose it silently.
  os.makedirs(workdir, exist_ok=True)
  path = script_path(workdir)
  with open(path, 'w') as f:
    f.write(script)
  try:
    job_id = _slurm_jobs.submit(path)
  except _slurm_jobs.SlurmError as e:
    _cli.fail(str(e), code=1)
  log = log_path.replace('%j', job_id)
  print(f'submitted job {job_id}: {path}\nlog: {log}', flush=True)
  if not args.wait:
    return 0
  return _slurm_jobs.wait(job_id, log)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
