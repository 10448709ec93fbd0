"""Real subprocesses, really killed: SIGTERM, SIGKILL (also mid-save) and a second run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(HERE, 'tiny_cnn_config.py')


def start(workdir, *extra):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(
      [sys.executable, '-m', 'lm.main', f'--config={CONFIG}', f'--workdir={workdir}', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def wait_for(predicate, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.02)
  return False


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(l)['step'] for l in open(path) if l.strip().endswith('}')]


def train_steps(workdir):
  """Steps of the training rows of metrics.jsonl (every 10 steps), in the order written."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = [json.loads(l) for l in open(path) if l.strip().endswith('}')]
  return [r['step'] for r in rows if 'train/loss' in r]


EVERY_ROW = list(range(10, 301, 10))  # tiny_cnn_config: 300 steps, a row every 10.


def done(workdir):
  return json.load(open(os.path.join(workdir, 'DONE')))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  code, out, err = finish(start(workdir))
  assert code == 0, err
  return done(workdir)


def test_sigterm_saves_exits_zero_and_resumes_to_the_same_result(tmp_path, reference):
  workdir = str(tmp_path)
  proc = start(workdir)
  assert wait_for(lambda: any(s >= 60 for s in logged_steps(workdir)))
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == 0, err
  assert 'stopped at step' in out
  stopped = int(out.split('stopped at step ')[1].split(';')[0])
  assert 60 <= stopped < 300
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
  t0 = time.time()
  code, out, err = finish(start(workdir))
  assert code == 0, err
  assert 'resuming from' in out and out.count('resuming') == 1
  # Each row once: the restart went on from step `stopped`. A retrain from step 0 would reach
  # the same loss, but would log the first rows twice.
  assert train_steps(workdir) == EVERY_ROW
  assert done(workdir)['eval/loss'] == reference['eval/loss']  # To the last bit.
  print(f'SIGTERM at step {stopped}: 0 steps lost, resume and finish took {time.time() - t0:.1f}s')


@pytest.mark.parametrize('moment', ['between_saves', 'during_save'])
def test_sigkill_resumes_from_the_last_complete_checkpoint(tmp_path, reference, moment):
  workdir = str(tmp_path)
  proc = start(workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  if moment == 'during_save':
    in_flight = lambda: glob.glob(os.path.join(ckpts, '*orbax-checkpoint-tmp*'))
    assert wait_for(lambda: any(s >= 60 for s in logged_steps(workdir)))
    assert wait_for(in_flight, timeout=60), 'never caught a save in flight'
  else:
    assert wait_for(lambda: any(s >= 90 for s in logged_steps(workdir)))
  proc.kill()
  proc.wait()
  complete = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  before = train_steps(workdir)
  code, out, err = finish(start(workdir))
  assert code == 0, err
  if complete:
    assert f'resuming from {os.path.abspath(ckpts)}/{complete[-1]}' in out
  # The restart logs the rows after its checkpoint, once each, after the killed run's rows
  # (which may go past the checkpoint: those steps are the ones lost and replayed).
  after = train_steps(workdir)
  assert after[:len(before)] == before
  assert after[len(before):] == [s for s in EVERY_ROW if s > (complete or [0])[-1]]
  assert not glob.glob(os.path.join(ckpts, '*tmp*'))  # The half-written save was removed.
  assert done(workdir)['eval/loss'] == reference['eval/loss']


def test_second_run_on_the_same_workdir_refuses(tmp_path):
  workdir = str(tmp_path)
  first = start(workdir)
  assert wait_for(lambda: logged_steps(workdir))
  code, out, err = finish(start(workdir))
  first.kill()
  first.wait()
  assert code == 2
  assert err.strip().startswith('error: another run is using workdir')


def test_sigterm_during_set_up_exits_zero_with_a_message(tmp_path):
  workdir = str(tmp_path)
  proc = start(workdir)
  line = proc.stdout.readline()
  while line and not line.startswith('workdir: '):  # Printed before the step compiles.
    line = proc.stdout.readline()
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == 0, err
  assert 'stopped before training resumed (at step 0)' in out
  assert 'Traceback' not in err


def test_two_sigterms_close_together_still_save(tmp_path, reference):
  """Cluster wrappers often signal twice; the second within seconds is the same request."""
  workdir = str(tmp_path)
  proc = start(workdir)
  assert wait_for(lambda: any(s >= 60 for s in logged_steps(workdir)))
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  # The second lands while stopping ('already stopping') or, when the save was quicker, as
  # Python shuts down (where a default handler would kill it: -15): either way exit 0.
  assert code == 0, err
  assert 'stopped at step' in out
  assert 'KeyboardInterrupt' not in err
  code, out, err = finish(start(workdir))
  assert code == 0, err
  assert train_steps(workdir) == EVERY_ROW
  assert done(workdir)['eval/loss'] == reference['eval/loss']
