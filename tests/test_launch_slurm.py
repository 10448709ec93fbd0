"""launch.slurm: the rendered script, job-state parsing, and real jobs on a one-node Slurm.

The real-Slurm tests need a cluster that answers `sinfo` (CI starts one with .ci/slurm.sh).
Without one they skip, unless LM_REQUIRE_SLURM=1, which CI sets so that a broken cluster
cannot pass silently.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch import _cli
from launch import _slurm_jobs
from launch import _trials
from launch import slurm
from launch import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'tiny_config.py')
TRAINER = ['--', '--config=experiments/gpt2_small.py', '--workdir=/shared/run']


def _render(*flags, trainer=TRAINER):
  args, trainer_args = slurm.parse([*flags, *trainer])
  log = os.path.join(os.path.abspath('/shared/run'), 'slurm-%j.out')
  return slurm.render(args, [args.python, '-m', 'lm.main', *trainer_args], log, '/shared/run')


def _sbatch(script: str) -> list[str]:
  return [l[len('#SBATCH '):] for l in script.splitlines() if l.startswith('#SBATCH ')]


def test_gpu_job_has_one_task_per_gpu_and_every_option():
  script = _render('--nodes=2', '--gpus_per_node=8', '--partition=gpu', '--account=proj',
                   '--time=24:00:00', '--cpus_per_task=12', '--job_name=gpt2',
                   '--sbatch=--constraint=h100', '--env', 'WANDB_MODE=offline',
                   '--env=NCCL_DEBUG=WARN x', '--python=/opt/venv/bin/python')
  assert _sbatch(script) == [
      '--job-name=gpt2', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-task=1',
      '--cpus-per-task=12', '--time=24:00:00', '--partition=gpu', '--account=proj',
      f'--chdir={os.getcwd()}', '--output=/shared/run/slurm-%j.out', '--open-mode=append',
      '--requeue', '--signal=B:USR1@180', '--constraint=h100']
  assert "export WANDB_MODE=offline\nexport NCCL_DEBUG='WARN x'\n" in script
  assert ('srun --kill-on-bad-exit=1 --cpus-per-task=12 /opt/venv/bin/python -m lm.main '
          '--config=experiments/gpt2_small.py --workdir=/shared/run &') in script
  assert 'workdir=/shared/run\n' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_cpu_defaults_and_gpu_split_between_tasks():
  lines = _sbatch(_render())
  assert '--ntasks-per-node=1' in lines and '--nodes=1' in lines
  assert not any(l.startswith(('--gpus', '--time', '--partition', '--account')) for l in lines)
  assert '--gpus-per-task=4' in _sbatch(_render('--gpus_per_node=8', '--ntasks_per_node=2'))
  assert f'srun --kill-on-bad-exit=1 {sys.executable} -m lm.main' in _render()


@pytest.mark.parametrize('flags,needle', [
    (['--gpus_per_node=8', '--ntasks_per_node=3'], 'multiple of'),
    (['--env=NOVALUE'], 'KEY=VALUE'),
    (['--wait'], 'add --submit'),
])
def test_bad_job_flags_are_usage_errors(flags, needle):
  with pytest.raises(_cli.UsageError, match=needle):
    slurm.parse([*flags, *TRAINER])


def test_script_is_valid_bash():
  result = subprocess.run(['bash', '-n'], input=_render('--env=A=b c'), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run([sys.executable, '-m', 'launch.slurm', '--dry_run', '--',
                           '--config=c.py', f'--workdir={workdir}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.startswith('#!/bin/bash\n#SBATCH')
  assert not workdir.exists() and not os.path.exists(slurm.script_path(str(workdir)))


def test_job_state_parsing_and_exit_codes():
  scontrol = ('JobId=7 ArrayJobId=7 ArrayTaskId=0 JobName=lm JobState=COMPLETED Reason=None '
              'ExitCode=0:0\nJobId=8 ArrayJobId=7 ArrayTaskId=1 JobState=FAILED ExitCode=3:0\n'
              'JobId=9 JobState=CANCELLED ExitCode=0:15\n')
  rows = _slurm_jobs.parse_scontrol(scontrol)
  assert rows == [('COMPLETED', 0), ('FAILED', 3), ('CANCELLED', 143)]
  assert _slurm_jobs.final_code(rows) == 3
  assert _slurm_jobs.final_code([('COMPLETED', 0)]) == 0
  assert _slurm_jobs.final_code([('TIMEOUT', 0)]) == 1
  assert _slurm_jobs.parse_sacct('CANCELLED by 0|0:15\nCOMPLETED|0:0\n') == [
      ('CANCELLED', 143), ('COMPLETED', 0)]


def test_sweep_array_runs_unfinished_trials_through_launch_sweep(tmp_path):
  exp = tmp_path / 'exp.py'
  exp.write_text(f'import sys\nsys.path.insert(0, {HERE!r})\nfrom tiny_config import get_config\n'
                 'def sweep():\n  return [{"seed": s} for s in range(4)]\n')
  sw = str(tmp_path / 'sw')
  spec = _trials.expand(str(exp), sw, [])
  for i in (0, 2):
    os.makedirs(spec['trials'][i]['workdir'])
    open(os.path.join(spec['trials'][i]['workdir'], 'DONE'), 'w').write('{}')
  args, _ = sweep.parse_run([f'--config={exp}', f'--sweep_dir={sw}', '--backend=slurm',
                             '--parallel=2', '--gpus_per_node=1'])
  script = sweep.render_array(spec, sw, args)
  assert '--array=1,3%2' in _sbatch(script)
  assert f'--output={sw}/slurm-%A_%a.out' in _sbatch(script)
  assert f'-m launch.sweep trial {sw} &' in script
  assert 'workdir=${workdirs[$SLURM_ARRAY_TASK_ID]}' in script
  assert f'{spec["trials"][3]["workdir"]}' in script.split('workdirs=(')[1].split(')')[0]


# --- a real cluster --------------------------------------------------------------------------

def _controller_answers() -> bool:
  """Whether `sinfo` is here and reaches a controller (a client alone is not a cluster)."""
  if not shutil.which('sinfo'):
    return False
  try:
    return subprocess.run(['sinfo', '-h'], capture_output=True, timeout=30,
                          check=False).returncode == 0
  except subprocess.TimeoutExpired:
    return False


needs_slurm = pytest.mark.skipif(
    not os.environ.get('LM_REQUIRE_SLURM') and not _controller_answers(),
    reason='no Slurm cluster here (sinfo missing or no controller answers); CI runs these '
           'after `bash .ci/slurm.sh`')


def _submit(workdir, *trainer_args, background=False):
  """Submits with --wait: returns the finished run, or a Popen following it."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # One CPU device per task.
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [sys.executable, '-m', 'launch.slurm', '--ntasks_per_node=2', '--submit', '--wait',
         '--', f'--config={TINY}', f'--workdir={workdir}', '--config.model.num_layers=1',
         *trainer_args]
  if not background:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _steps(workdir) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'train/loss' in r]


def _job_log(workdir, out: str) -> str:
  job_id = re.search(r'submitted job (\d+)', out).group(1)
  with open(os.path.join(workdir, f'slurm-{job_id}.out')) as f:
    return f.read()


@needs_slurm
@pytest.mark.slow
def test_two_task_job_trains_then_a_second_job_resumes(tmp_path):
  assert shutil.which('sinfo'), 'LM_REQUIRE_SLURM is set but sinfo is missing'
  workdir = str(tmp_path / 'run')
  first = _submit(workdir)
  assert first.returncode == 0, first.stdout[-4000:] + first.stderr
  log = _job_log(workdir, first.stdout)
  assert '[Gloo] Rank 1 is connected to 1 peer ranks' in log  # Two JAX processes, one job.
  assert json.load(open(os.path.join(workdir, 'DONE')))['step'] == 20
  assert _steps(workdir) == [5, 10, 15, 20]

  second = _submit(workdir, '--config.train.steps=30')
  assert second.returncode == 0, second.stdout[-4000:] + second.stderr
  log = _job_log(workdir, second.stdout)
  assert f'resuming from {workdir}/checkpoints/20' in log
  assert _steps(workdir) == [5, 10, 15, 20, 25, 30]  # Nothing before step 20 trained again.
  assert json.load(open(os.path.join(workdir, 'DONE')))['step'] == 30


def _batch_shell_pid(job_id: str) -> int | None:
  out = subprocess.run(['scontrol', 'listpids', job_id], capture_output=True, text=True,
                       check=False).stdout
  for line in out.splitlines()[1:]:
    pid, _, step, local_id, _ = line.split()[:5]
    if step == 'batch' and local_id == '0':
      return int(pid)
  return None


@needs_slurm
@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(tmp_path):
  assert shutil.which('sinfo'), 'LM_REQUIRE_SLURM is set but sinfo is missing'
  workdir = str(tmp_path / 'run')
  proc = _submit(workdir, '--config.train.steps=400', '--config.train.log_every=10',
                 '--config.train.eval_every=0', '--config.train.checkpoint_every=1000',
                 background=True)
  lines, job_id, deadline = [], None, time.time() + 300
  while True:  # Until the trainer is past its first logged steps.
    assert time.time() < deadline and proc.poll() is None, ''.join(lines)
    lines.append(proc.stdout.readline())
    job_id = job_id or (re.findall(r'submitted job (\d+)', lines[-1]) or [None])[0]
    if re.match(r'step [1-9]\d/400', lines[-1]):
      break
  # What Slurm does --signal_s seconds before the time limit (B:USR1 to the batch shell).
  os.kill(_batch_shell_pid(job_id), signal.SIGUSR1)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, ''.join(lines) + out
  log = _job_log(workdir, ''.join(lines) + out)
  stopped = int(re.search(r'stopped (?:by signal )?at step (\d+)', log).group(1))
  assert 'time limit near: checkpointing, then requeueing' in log
  assert f'job {job_id} (restart 1)' in log
  assert f'resuming from {workdir}/checkpoints/{stopped}' in log
  assert json.load(open(os.path.join(workdir, 'DONE')))['step'] == 400
  steps = _steps(workdir)
  assert steps == sorted(set(steps)) and steps[-1] == 400


@needs_slurm
@pytest.mark.slow
def test_sweep_as_a_job_array_runs_each_trial_once(tmp_path):
  assert shutil.which('sinfo'), 'LM_REQUIRE_SLURM is set but sinfo is missing'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  sw = str(tmp_path / 'sw')
  cmd = [sys.executable, '-m', 'launch.sweep', f'--config={TINY}', f'--sweep_dir={sw}',
         '--backend=slurm', '--submit', '--wait', '--', '--config.model.num_layers=1']
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stdout[-4000:] + first.stderr
  spec = _trials.read(sw)
  for trial in spec['trials']:
    assert json.load(open(os.path.join(trial['workdir'], 'DONE')))['step'] == 20
    assert _steps(trial['workdir']) == [5, 10, 15, 20]
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and 'nothing to submit' in again.stdout


@needs_slurm
@pytest.mark.slow
def test_fixed_mesh_spans_the_two_tasks(tmp_path):
  """Each task made the whole mesh's 2 CPU devices (4 in all) and both refused fsdp=2."""
  assert shutil.which('sinfo'), 'LM_REQUIRE_SLURM is set but sinfo is missing'
  workdir = str(tmp_path / 'run')
  run = _submit(workdir, '--config.mesh.data=1', '--config.mesh.fsdp=2',
                '--config.mesh.tensor=1', '--config.train.steps=10')
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr
  log = _job_log(workdir, run.stdout)
  assert '[Gloo] Rank 1 is connected to 1 peer ranks' in log
  assert 'but there are 4 devices' not in log
  assert json.load(open(os.path.join(workdir, 'DONE')))['step'] == 10


def _task_pid(tag: str, rank: int) -> int | None:
  """The lm.main of Slurm task `rank` in the job whose environment has LM_TEST_TAG=tag."""
  want = {f'LM_TEST_TAG={tag}'.encode(), f'SLURM_PROCID={rank}'.encode()}
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        env = set(f.read().split(b'\0'))
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmdline = f.read()
    except OSError:
      continue
    if want <= env and b'lm.main' in cmdline:
      return int(pid)
  return None


@needs_slurm
@pytest.mark.slow
def test_a_dead_task_ends_the_job_at_once(tmp_path):
  """srun --kill-on-bad-exit=1: the surviving task does not wait a minute for its peer."""
  assert shutil.which('sinfo'), 'LM_REQUIRE_SLURM is set but sinfo is missing'
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  os.environ['LM_TEST_TAG'] = workdir  # sbatch exports the submitting environment.
  try:
    proc = _submit(workdir, '--config.train.steps=400', '--config.train.checkpoint_every=5',
                   '--config.train.eval_every=0', background=True)
  finally:
    del os.environ['LM_TEST_TAG']
  deadline = time.time() + 300
  while (checkpoint.latest_step(workdir) or 0) < 5:
    assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.5)
  os.kill(_task_pid(workdir, 1), signal.SIGKILL)
  killed = time.time()
  out, _ = proc.communicate(timeout=300)
  took = time.time() - killed
  assert proc.returncode != 0, out[-3000:]
  log = _job_log(workdir, out)
  assert re.search(r'srun: error: .*: task 1: Killed', log), log[-3000:]
  # srun terminates the step at once: SIGTERM, then SIGKILL after the cluster's KillWait (the
  # survivor cannot save without its peer). Without --kill-on-bad-exit it would wait for
  # JAX's heartbeat to time out instead. launch.slurm --wait polls every 2 s.
  assert took < _kill_wait_s() + 15, f'{took:.0f}s after the kill: the job outlived KillWait'
  print(f'job ended {took:.1f}s after one task was killed (exit {proc.returncode}; '
        f'KillWait {_kill_wait_s()}s)')


def _kill_wait_s() -> int:
  out = subprocess.run(['scontrol', 'show', 'config'], capture_output=True, text=True,
                       check=False).stdout
  return int(re.search(r'KillWait\s*=\s*(\d+)', out).group(1))
