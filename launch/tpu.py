"""`lm.main` on every worker of a Cloud TPU VM slice, through `gcloud ... tpu-vm ssh`.

  python -m launch.tpu --tpu=my-v5p-64 --zone=us-east5-a --dry_run -- \
      --config=experiments/gpt2_small.py --workdir=gs://bucket/run     # prints the commands

Three steps, each one gcloud command run on all workers at once: install the code (a git
clone of --repo/--branch, or a copy of this checkout when --repo is empty), start lm.main
under nohup with its output in ~/lm_logs/<name>.log, and tail worker 0's log. Ctrl-C stops
the tail, not the run; `--action=stop` sends the trainer SIGTERM, which saves a checkpoint.
Running the same command again resumes from the workdir (use gs:// so all workers share it).
"""

import argparse
import os
import shlex
import subprocess
import sys

from launch import _cli

ACTIONS = ('all', 'install', 'run', 'tail', 'stop')


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  own, trainer_args = _cli.split(argv)
  p = argparse.ArgumentParser(prog='python -m launch.tpu', description=__doc__.split('\n')[0],
                              usage='%(prog)s --tpu=NAME --zone=ZONE [flags] -- --config=... '
                                    '--workdir=gs://...')
  p.add_argument('--tpu', required=True, help='TPU VM name.')
  p.add_argument('--zone', required=True, help='Its zone, e.g. us-east5-a.')
  p.add_argument('--project', default='', help='GCP project (empty: gcloud default).')
  p.add_argument('--repo', default='', help='Git URL to clone on the workers (empty: copy '
                 'this checkout, uncommitted changes included).')
  p.add_argument('--branch', default='main', help='Branch or tag to check out with --repo.')
  p.add_argument('--remote_dir', default='lm', help='Code directory on the workers, under ~.')
  p.add_argument('--pip', default='jax[tpu]',
                 help='Extra packages (space-separated) pip installs with the repo.')
  p.add_argument('--python', default='python3', help='Interpreter on the workers.')
  p.add_argument('--name', default='lm', help='Names the log and pid files in ~/lm_logs.')
  p.add_argument('--action', choices=ACTIONS, default='all',
                 help='all = install, run, tail; or one of them; stop sends SIGTERM.')
  p.add_argument('--dry_run', action='store_true', help='Print the commands; run nothing.')
  args = p.parse_args(own)
  if args.action in ('all', 'run'):
    _cli.require_trainer_flags(trainer_args, 'tpu')
  return args, trainer_args


def _gcloud(args, verb: str, positional: list[str], *flags: str) -> list[str]:
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *positional, *where, *flags]


def _ssh(args, remote: str, worker: str = 'all') -> list[str]:
  return _gcloud(args, 'ssh', [args.tpu], f'--worker={worker}', f'--command={remote}')


def _pip_install(args) -> str:
  # Double quotes keep `jax[tpu]` from being read as a glob by the remote shell.
  extra = ''.join(f' "{p}"' for p in args.pip.split())
  return f'cd {args.remote_dir} && {args.python} -m pip install -q -e .{extra}'


def install_commands(args, local_dir: str) -> list[list[str]]:
  d = args.remote_dir
  if args.repo:
    repo, branch = shlex.quote(args.repo), shlex.quote(args.branch)
    # Idempotent: a second launch updates the checkout instead of failing on clone.
    get = (f'if [ -d {d}/.git ]; then git -C {d} fetch -q origin {branch} && '
           f'git -C {d} checkout -q -B {branch} FETCH_HEAD; '
           f'else git clone -q --branch {branch} {repo} {d}; fi')
    return [_ssh(args, f'{get} && {_pip_install(args)}')]
  tarball = f'/tmp/{args.tpu}-{args.name}-code.tgz'
  pack = ['tar', '--exclude=.git', '--exclude=.venv', '--exclude=__pycache__', '-czf', tarball,
          '-C', local_dir, '.']
  copy = _gcloud(args, 'scp', [tarball, f'{args.tpu}:{args.name}-code.tgz'], '--worker=all')
  # Unpacked over the old copy, never `rm -rf`: a relative workdir may live inside it.
  unpack = f'mkdir -p {d} && tar -xzf {args.name}-code.tgz -C {d} && {_pip_install(args)}'
  return [pack, copy, _ssh(args, unpack)]


def run_command(args, trainer_args: list[str]) -> list[str]:
  log, pid = f'lm_logs/{args.name}.log', f'lm_logs/{args.name}.pid'
  # nohup and no stdin: the trainer outlives the ssh session that started it.
  remote = (f'mkdir -p lm_logs && cd {args.remote_dir} && nohup '
            f'{shlex.join([args.python, "-m", "lm.main", *trainer_args])} '
            f'>> ~/{log} 2>&1 < /dev/null & echo $! > ~/{pid}')
  return _ssh(args, remote)


def tail_command(args) -> list[str]:
  return _ssh(args, f'tail -n +1 -F lm_logs/{args.name}.log', worker='0')


def stop_command(args) -> list[str]:
  return _ssh(args, f'kill -TERM $(cat lm_logs/{args.name}.pid)')


def commands(args, trainer_args: list[str], local_dir: str) -> list[list[str]]:
  out = []
  if args.action in ('all', 'install'):
    out += install_commands(args, local_dir)
  if args.action in ('all', 'run'):
    out.append(run_command(args, trainer_args))
  if args.action in ('all', 'tail'):
    out.append(tail_command(args))
  if args.action == 'stop':
    out.append(stop_command(args))
  return out


def main(argv: list[str]) -> int:
  try:
    args, trainer_args = parse(argv)
  except _cli.UsageError as e:
    _cli.fail(str(e))
  cmds = commands(args, trainer_args, os.getcwd())
  if args.dry_run:
    print('\n'.join(shlex.join(c) for c in cmds))
    return 0
  for cmd in cmds:
    print(f'+ {shlex.join(cmd)}', flush=True)
    try:
      code = subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:  # Only the tail runs long; the run itself goes on.
      print('\nstopped tailing; the run goes on (--action=stop stops it)', file=sys.stderr)
      return 130
    except FileNotFoundError:
      _cli.fail(f'{cmd[0]} not found; install the Google Cloud SDK', code=1)
    if code:
      return code
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
