"""launch.local: device shares, prefixed output, fail-fast, signals, and 2 vs 1 processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import _procs
from launch import local

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'tiny_config.py')

# Stands in for `python -m lm.main`: reports its environment, then behaves as argv asks.
_FAKE = '''#!{python}
import os, signal, sys, time
pid = os.environ['LM_PROCESS_ID']
def on_term(signum, frame):
  if 'marker' in os.environ:  # Before printing: the launcher may be gone, and its pipe.
    open(os.environ['marker'] + pid, 'w').write(str(signum))
  print('saving on signal', signum, flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
# Printed once the handlers are in place: the tests signal as soon as they read it.
print('env', pid, os.environ['LM_NUM_PROCESSES'], os.environ['LM_COORDINATOR'],
      os.environ['XLA_FLAGS'], ' '.join(sys.argv[1:]), flush=True)
if 'fail' in sys.argv and pid == '1':
  time.sleep(0.3)
  sys.exit(3)
if 'die' in sys.argv:
  if pid == '1':
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
  # What a trainer does once a peer is gone: waits in a collective and ignores SIGTERM.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if 'hang' in sys.argv or 'fail' in sys.argv or 'die' in sys.argv:
  time.sleep(120)
'''


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / 'fake_python'
  path.write_text(_FAKE.format(python=sys.executable))
  path.chmod(0o755)
  return str(path)


def _launch(fake, *trainer_args, n=2, devices=4, env_extra=None):
  cmd = [sys.executable, '-m', 'launch.local', f'--num_processes={n}',
         f'--devices_per_process={devices}', '--platform=cpu', f'--python={fake}', '--',
         '--config=c.py', '--workdir=w', *trainer_args]
  env = {**os.environ, **(env_extra or {})}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_each_process_gets_its_id_share_and_prefix(fake):
  proc = _launch(fake, '--config.mesh.fsdp=8')
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  lines = sorted(l for l in out.splitlines() if ' env ' in l)
  assert len(lines) == 2, out
  coordinators = set()
  for i, line in enumerate(lines):
    prefix, _, pid, num, coord, xla, *args = line.split()
    assert (prefix, pid, num) == (f'[p{i}]', str(i), '2')
    # The test runner's own 8-device flag is replaced, not appended to.
    assert xla == '--xla_force_host_platform_device_count=4'
    assert args == ['-m', 'lm.main', '--config=c.py', '--workdir=w', '--config.mesh.fsdp=8']
    coordinators.add(coord)
  assert len(coordinators) == 1 and coordinators.pop().startswith('127.0.0.1:')


def test_one_failing_process_stops_the_rest_and_sets_the_exit_code(fake):
  start = time.time()
  proc = _launch(fake, 'fail', n=3)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 3, out
  assert time.time() - start < 15, 'the other processes were left running'
  assert '[p1] exited with code 3; stopped the other 2 processes. Its error is above' in out
  # Not asked to save: a save needs every process, so they would only hang in it.
  assert 'saving on signal' not in out


def _save_a_checkpoint(workdir, step):
  # In a child: JAX in this process would make every later fork (the launcher's) unsafe.
  code = ('import sys, numpy as np; from lm import checkpoint; '
          'm = checkpoint.manager(sys.argv[1]); '
          'checkpoint.save(m, int(sys.argv[2]), {"w": np.zeros(3, np.float32)}); m.close()')
  subprocess.run([sys.executable, '-c', code, workdir, str(step)], cwd=ROOT, check=True,
                 timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_a_dead_process_ends_the_job_in_seconds_naming_the_checkpoint(fake, tmp_path):
  """p1 is SIGKILLed; p0 ignores SIGTERM as a trainer stuck in a collective does."""
  workdir = str(tmp_path / 'run')
  _save_a_checkpoint(workdir, 12)
  start = time.time()
  proc = _launch(fake, 'die', f'--workdir={workdir}')
  out, _ = proc.communicate(timeout=60)
  took = time.time() - start
  assert proc.returncode == 128 + signal.SIGKILL, out
  assert took < 15, f'{took:.0f}s: the survivor was left waiting for its dead peer'
  line = (f'[p1] was killed by signal 9 (SIGKILL); stopped the other 1 process. Run the same '
          f'command to resume from checkpoint 12 ({workdir}/checkpoints/12)')
  assert out.strip().splitlines()[-1] == line, out
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12']  # Read only.


def test_a_dead_process_before_any_checkpoint_says_it_starts_again(fake, tmp_path):
  proc = _launch(fake, 'die', f'--workdir={tmp_path / "run"}')
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGKILL, out
  assert out.strip().endswith(f'No checkpoint in {tmp_path / "run"} yet: the same command '
                              'starts again'), out
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signals_to_the_launcher_reach_every_process_once(fake, signum):
  proc = _launch(fake, 'hang')
  deadline = time.time() + 30
  lines = []
  while len([l for l in lines if ' env ' in l]) < 2:
    assert time.time() < deadline
    lines.append(proc.stdout.readline())
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  for i in range(2):
    assert out.count(f'[p{i}] saving on signal {int(signum)}') == 1, out


def test_children_do_not_outlive_a_killed_launcher(fake, tmp_path):
  marker = str(tmp_path / 'term_')
  proc = _launch(fake, 'hang', env_extra={'marker': marker})
  deadline = time.time() + 30
  seen = 0
  while seen < 2:
    assert time.time() < deadline
    seen += ' env ' in proc.stdout.readline()
  proc.kill()  # SIGKILL: the launcher cannot forward anything itself.
  proc.wait()
  while not all(os.path.exists(marker + str(i)) for i in range(2)):
    assert time.time() < deadline + 30, 'a child outlived its launcher'
    time.sleep(0.1)
  assert open(marker + '0').read() == str(int(signal.SIGTERM))


def test_run_group_returns_the_first_failure_and_shell_style_signal_codes():
  sleeper = [sys.executable, '-c', 'import time; time.sleep(60)']
  failer = [sys.executable, '-c', 'import sys, time; time.sleep(0.2); sys.exit(7)']
  env = dict(os.environ)
  assert _procs.run_group([sleeper, failer], [env, env], ['[a] ', '[b] '], grace_s=5) == 7
  killed = [sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)']
  assert _procs.run_group([killed], [env], ['']) == 128 + signal.SIGKILL


def test_gpu_shares_are_disjoint_and_checked():
  gpus = [str(i) for i in range(8)]
  shares = [local.device_env('gpu', i, 4, gpus)['CUDA_VISIBLE_DEVICES'] for i in range(2)]
  assert shares == ['0,1,2,3', '4,5,6,7']
  with pytest.raises(local._cli.UsageError, match='only 8'):
    local.device_env('gpu', 2, 4, gpus)


def test_missing_trainer_flags_is_exit_2():
  result = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=2', '--',
                           '--workdir=/tmp/x'], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 2 and result.stderr.startswith('error: ')
  assert '--config=' in result.stderr


def _losses(workdir) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  common = [f'--config={TINY}', '--config.model.num_layers=1', '--config.train.steps=20',
            '--config.train.log_every=1', '--config.train.batch_size=8']
  runs = {'one': (1, 4), 'two': (2, 2)}  # 4 devices either way: the same mesh.
  for name, (n, devices) in runs.items():
    result = subprocess.run(
        [sys.executable, '-m', 'launch.local', f'--num_processes={n}',
         f'--devices_per_process={devices}', '--platform=cpu', '--', *common,
         f'--workdir={tmp_path / name}'], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  one, two = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(one) == sorted(two) and len(one) >= 18  # The first step only compiles.
  for step in one:
    assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
  assert one[max(one)] < one[min(one)]  # It trained.


def _pid_of(tag: str, process_id: int) -> int | None:
  """The lm.main process whose environment holds LM_TEST_TAG=tag and that LM_PROCESS_ID."""
  want = {f'LM_TEST_TAG={tag}'.encode(), f'LM_PROCESS_ID={process_id}'.encode()}
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


@pytest.mark.slow
def test_killing_one_trainer_ends_the_job_in_seconds_and_the_same_command_resumes(tmp_path):
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['LM_TEST_TAG'] = workdir
  cmd = [sys.executable, '-m', 'launch.local', '--num_processes=2', '--devices_per_process=1',
         '--platform=cpu', '--', f'--config={TINY}', f'--workdir={workdir}',
         '--config.model.num_layers=1', '--config.train.steps=400',
         '--config.train.checkpoint_every=5', '--config.train.eval_every=0']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while (checkpoint.latest_step(workdir) or 0) < 10:
    assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.2)
  os.kill(_pid_of(workdir, 1), signal.SIGKILL)
  killed = time.time()
  out, _ = proc.communicate(timeout=120)
  took = time.time() - killed
  assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
  assert took < 15, f'{took:.0f}s after the kill: the survivor hung waiting for its peer'
  last = out.strip().splitlines()[-1]
  step = checkpoint.latest_step(workdir)
  assert last == (f'[p1] was killed by signal 9 (SIGKILL); stopped the other 1 process. Run '
                  f'the same command to resume from checkpoint {step} '
                  f'({workdir}/checkpoints/{step})'), out[-3000:]
  print(f'launcher exited {took:.1f}s after the kill; resuming from step {step}')

  # The same command, shortened to 5 more steps.
  again = subprocess.run([*cmd, f'--config.train.steps={step + 5}'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stdout[-3000:]
  assert f'[p0] resuming from {workdir}/checkpoints/{step}' in again.stdout
  assert checkpoint.latest_step(workdir) == step + 5
