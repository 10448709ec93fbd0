"""lm/checkpoint.py: readers never write, corrupt checkpoints are one-line errors."""

import glob
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import checkpoint
from lm.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _state(step: int) -> dict:
  # Random and large enough that orbax stores the arrays in data files, not inline in the
  # OCDBT index (which it does for values of a few hundred bytes).
  rng = np.random.default_rng(step)
  return {'step': np.asarray(step, np.int32),
          'params': {'w': rng.normal(size=(64, 256)).astype(np.float32),
                     'b': rng.normal(size=(4096,)).astype(np.float32)}}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _save_steps(workdir, steps):
  mngr = checkpoint.manager(str(workdir), keep=10)
  for step in steps:
    checkpoint.save(mngr, step, _state(step))
  mngr.wait_until_finished()
  mngr.close()


def _snapshot(root) -> dict:
  """Every path under `root` with its size and modification time."""
  out = {}
  for path in glob.glob(os.path.join(root, '**'), recursive=True):
    st = os.stat(path)
    out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def test_reader_changes_nothing_and_reads_the_latest_complete_checkpoint(tmp_path):
  _save_steps(tmp_path, [1, 2])
  # What a trainer has in flight: a save orbax has not renamed into place yet.
  in_flight = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp'
  (in_flight / 'default').mkdir(parents=True)
  (in_flight / 'default' / 'half_written').write_bytes(b'x' * 100)
  before = _snapshot(tmp_path)

  assert checkpoint.latest_step(str(tmp_path)) == 2
  reader = checkpoint.reader(str(tmp_path))
  assert reader.all_steps() == [1, 2]
  reader.close()
  step, state = checkpoint.restore_latest(str(tmp_path))
  assert step == 2
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  assert _snapshot(tmp_path) == before  # The save in flight is still there, nothing added.

  # The trainer's manager is the one that removes it (in a background thread).
  mngr = checkpoint.manager(str(tmp_path))
  deadline = time.time() + 30
  while in_flight.exists():
    assert time.time() < deadline, 'the trainer no longer removes half-written saves'
    time.sleep(0.05)
  mngr.close()


@pytest.mark.parametrize('error', [FileNotFoundError, NotADirectoryError])
def test_restore_latest_reads_again_when_a_listed_step_vanishes(tmp_path, monkeypatch, error):
  """The run deletes an old step (keep_checkpoints) while a reader's manager lists the
  directory; orbax then raises one of these (NotADirectoryError: "Path is not a directory:
  .../checkpoints/37" killed a reader in the suite). The reader opens the directory again."""
  _save_steps(tmp_path, [1, 2])
  opened = checkpoint.reader
  calls = []

  def racing_reader(workdir, handler=None):
    calls.append(workdir)
    if len(calls) == 1:
      raise error(f'Path is not a directory: {workdir}/checkpoints/1')
    return opened(workdir, handler)

  monkeypatch.setattr(checkpoint, 'reader', racing_reader)
  step, state = checkpoint.restore_latest(str(tmp_path))
  assert (step, len(calls)) == (2, 2)
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])


def test_latest_step_lists_again_when_a_listed_step_vanishes(tmp_path, monkeypatch):
  _save_steps(tmp_path, [1, 2])
  step_lib = checkpoint.ocp.path.step
  listed = step_lib.latest_step_metadata
  calls = []

  def racing_listing(*args):
    calls.append(args)
    if len(calls) == 1:
      raise NotADirectoryError(f'Path is not a directory: {tmp_path}/checkpoints/1')
    return listed(*args)

  monkeypatch.setattr(step_lib, 'latest_step_metadata', racing_listing)
  assert (checkpoint.latest_step(str(tmp_path)), len(calls)) == (2, 2)


def test_reader_of_an_empty_workdir_creates_nothing(tmp_path):
  with pytest.raises(ConfigError, match='no checkpoint in .*train there first'):
    checkpoint.restore_latest(str(tmp_path))
  assert checkpoint.latest_step(str(tmp_path)) is None
  assert not os.listdir(tmp_path)


def _data_files(workdir, step) -> list[str]:
  root = os.path.join(workdir, 'checkpoints', str(step))
  files = [p for p in glob.glob(os.path.join(root, '**', 'd', '*'), recursive=True)
           if os.path.isfile(p)]
  assert files, f'no array data files under {root}: has the orbax layout changed?'
  return sorted(files, key=os.path.getsize)


@pytest.mark.parametrize('damage', ['delete', 'truncate'])
def test_corrupt_newest_checkpoint_is_one_line_naming_the_one_before(tmp_path, damage):
  _save_steps(tmp_path, [1, 2])
  biggest = _data_files(tmp_path, 2)[-1]
  if damage == 'delete':
    os.remove(biggest)
  else:
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  directory = os.path.join(tmp_path, 'checkpoints')

  mngr = checkpoint.manager(str(tmp_path))
  with pytest.raises(ConfigError) as trainer_error:
    checkpoint.restore(mngr, 2, _abstract(_state(0)))
  mngr.close()
  message = str(trainer_error.value)
  assert '\n' not in message and len(message) < 700, message
  assert message.startswith(f'checkpoint {directory}/2 cannot be restored (')
  assert message.endswith(f'move it away (mv {directory}/2 {tmp_path}/corrupt-2) and run the '
                          'same command to resume from checkpoint 1'), message

  with pytest.raises(ConfigError, match=r'checkpoints/2 cannot be restored .*run again to use '
                                        r'checkpoint 1$'):
    checkpoint.restore_latest(str(tmp_path))

  # The fix works: moved away, the reader and the trainer both get step 1.
  os.rename(os.path.join(directory, '2'), os.path.join(tmp_path, 'corrupt-2'))
  step, state = checkpoint.restore_latest(str(tmp_path))
  assert step == 1 and int(state['step']) == 1


def test_only_checkpoint_corrupt_says_to_train_again(tmp_path):
  _save_steps(tmp_path, [4])
  for path in _data_files(tmp_path, 4):
    os.remove(path)
  with pytest.raises(ConfigError, match=r'checkpoints/4 cannot be restored .*train again: it is '
                                        'the only checkpoint'):
    checkpoint.restore_latest(str(tmp_path))


@pytest.mark.slow
def test_sampling_while_training_does_not_break_the_run(tmp_path):
  """A run saving every step while another process restores its latest checkpoint in a loop.

  Before readers were read-only, each reader's manager deleted the save in flight and the run
  died with `saving a checkpoint failed (NOT_FOUND: ...orbax-checkpoint-tmp...)`. With
  keep_checkpoints=2 the run also deletes the step a reader may be reading.
  """
  workdir = str(tmp_path / 'run')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  steps = 40
  trainer = subprocess.Popen(
      [sys.executable, '-m', 'lm.main', f'--config={os.path.join(HERE, "tiny_config.py")}',
       f'--workdir={workdir}', '--config.model.num_layers=1', f'--config.train.steps={steps}',
       '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=2',
       '--config.train.eval_every=0'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  reader_script = (
      'import sys, time\n'
      'from lm import checkpoint\n'
      'from lm.config import ConfigError\n'
      'reads, start = set(), time.time()\n'
      'while time.time() - start < 300 and not checkpoint.os.path.exists(sys.argv[1] + "/DONE"):\n'
      '  try:\n'
      '    step, _ = checkpoint.restore_latest(sys.argv[1])\n'
      '    reads.add(step)\n'
      '  except ConfigError as e:\n'
      '    if "no checkpoint in" not in str(e) and "no config.json" not in str(e): raise\n'
      '    time.sleep(0.05)\n'
      'print("steps read", sorted(reads))\n')
  reader = subprocess.run([sys.executable, '-c', reader_script, workdir], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
  out, _ = trainer.communicate(timeout=300)
  assert trainer.returncode == 0, out[-3000:]
  assert reader.returncode == 0, reader.stderr[-3000:]
  read = json.loads(reader.stdout.split('steps read ')[1].replace("'", '"'))
  print("reader restored steps", read)
  assert len(read) >= 3, f'the reader overlapped too few saves to prove anything: {read}'
  assert checkpoint.reader(workdir).all_steps() == [steps - 1, steps]
  assert json.load(open(os.path.join(workdir, 'DONE')))['step'] == steps
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))
