"""launch.tpu renders gcloud commands; tests compare them as strings and run nothing."""

import os
import shlex
import subprocess
import sys

import pytest

from launch import _cli
from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = ['--', '--config=experiments/gpt2_small.py', '--workdir=gs://bucket/run',
           '--config.mesh.fsdp=-1']


def _rendered(*flags, trainer=TRAINER, local_dir='/src/lm') -> list[str]:
  args, trainer_args = tpu.parse(['--tpu=my-v5p-64', '--zone=us-east5-a', *flags, *trainer])
  return [shlex.join(c) for c in tpu.commands(args, trainer_args, local_dir)]


def test_git_install_run_and_tail():
  assert _rendered('--repo=https://github.com/me/lm.git', '--branch=dev',
                   '--project=proj') == [
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --project=proj --worker=all "
      "'--command=if [ -d lm/.git ]; then git -C lm fetch -q origin dev && "
      "git -C lm checkout -q -B dev FETCH_HEAD; "
      "else git clone -q --branch dev https://github.com/me/lm.git lm; fi && "
      "cd lm && python3 -m pip install -q -e . \"jax[tpu]\"'",
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --project=proj --worker=all "
      "'--command=mkdir -p lm_logs && cd lm && nohup python3 -m lm.main "
      "--config=experiments/gpt2_small.py --workdir=gs://bucket/run --config.mesh.fsdp=-1 "
      ">> ~/lm_logs/lm.log 2>&1 < /dev/null & echo $! > ~/lm_logs/lm.pid'",
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --project=proj --worker=0 "
      "'--command=tail -n +1 -F lm_logs/lm.log'",
  ]


def test_copy_install_packs_this_checkout_without_venv_or_git():
  assert _rendered('--action=install', '--name=exp1', '--pip=jax[tpu] tensorstore') == [
      'tar --exclude=.git --exclude=.venv --exclude=__pycache__ -czf '
      '/tmp/my-v5p-64-exp1-code.tgz -C /src/lm .',
      'gcloud compute tpus tpu-vm scp /tmp/my-v5p-64-exp1-code.tgz my-v5p-64:exp1-code.tgz '
      '--zone=us-east5-a --worker=all',
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all "
      "'--command=mkdir -p lm && tar -xzf exp1-code.tgz -C lm && "
      "cd lm && python3 -m pip install -q -e . \"jax[tpu]\" \"tensorstore\"'",
  ]


def test_trainer_args_with_spaces_stay_one_argument_on_the_worker():
  (run,) = _rendered('--action=run', trainer=['--', '--config=c.py', '--workdir=gs://b/r',
                                                "--config.data.name=files:/d/my texts/*.txt"])
  remote = shlex.split(run)[-1][len('--command='):]
  worker_argv = shlex.split(remote.split('nohup ', 1)[1].split(' >> ')[0])
  assert worker_argv == ['python3', '-m', 'lm.main', '--config=c.py', '--workdir=gs://b/r',
                         '--config.data.name=files:/d/my texts/*.txt']


def test_stop_sends_sigterm_to_the_recorded_pid():
  assert _rendered('--action=stop', '--name=exp1', trainer=[]) == [
      "gcloud compute tpus tpu-vm ssh my-v5p-64 --zone=us-east5-a --worker=all "
      "'--command=kill -TERM $(cat lm_logs/exp1.pid)'"]


def test_run_needs_trainer_flags():
  with pytest.raises(_cli.UsageError, match='--config='):
    _rendered(trainer=[])


def test_dry_run_cli_prints_one_command_per_line():
  result = subprocess.run([sys.executable, '-m', 'launch.tpu', '--tpu=t', '--zone=z',
                           '--repo=r', '--dry_run', '--', '--config=c', '--workdir=w'],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 and all(l.startswith('gcloud compute tpus tpu-vm ssh t ') for l in lines)
