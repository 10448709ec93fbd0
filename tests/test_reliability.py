"""Injected faults: divergence, a full disk, concurrent runs, config drift, resharding."""

import glob
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import train
from lm.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
TFDS = os.path.join(HERE, '..', '..', 'shared', 'tfds')


def tiny_cnn(**overrides):
  c = config_lib.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir=TFDS, eval_split='test', max_examples=256,
                augment=False)
  c.model.name = 'simple_cnn'
  c.train.update(steps=12, batch_size=8, log_every=1, eval_every=0, checkpoint_every=5)
  c.optim.update(name='adam', lr=1e-3, schedule='constant', warmup_steps=0)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def poison(trainer, at_index):
  """Inf pixels in the batch of one data index: the loss of that step is not finite."""
  original = trainer.task.data.train_batch

  def train_batch(index):
    batch = original(index)
    if index == at_index:
      batch = {**batch, 'image': np.full_like(batch['image'], np.inf)}
    return batch
  trainer.task.data.train_batch = train_batch


def all_finite(tree):
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


def test_divergence_stops_naming_the_step_and_last_good_checkpoint(tmp_path):
  trainer = train.Trainer(tiny_cnn(), str(tmp_path))
  poison(trainer, 7)
  with pytest.raises(train.Diverged, match=r'step 7 .*last good checkpoint is step 5'):
    trainer.run()
  assert trainer.ckpt.all_steps() == [5]
  state = train.Trainer(tiny_cnn(), str(tmp_path)).initial_state()
  assert int(state.step) == 5 and all_finite(state)


def test_divergence_rolls_back_and_skips_the_batch(tmp_path):
  trainer = train.Trainer(tiny_cnn(**{'train.on_nan': 'rollback'}), str(tmp_path))
  poison(trainer, 7)
  result = trainer.run()
  assert np.isfinite(result['eval/loss'])
  assert json.load(open(tmp_path / 'skipped_steps.json')) == [7]
  for step in trainer.ckpt.all_steps():
    assert all_finite(train.checkpoint.restore(trainer.ckpt, step, trainer.abstract_state))


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
  config = tiny_cnn(**{'train.on_nan': 'rollback', 'train.max_rollbacks': 0})
  trainer = train.Trainer(config, str(tmp_path))
  poison(trainer, 3)
  with pytest.raises(train.Diverged, match='after 0 rollbacks|train.on_nan=stop|step 3'):
    trainer.run()


def test_nonfinite_step_leaves_the_state_unchanged(tmp_path):
  trainer = train.Trainer(tiny_cnn(), str(tmp_path))
  state = trainer.initial_state()
  before = jax.device_get(state)
  batch = trainer.task.data.train_batch(0)
  batch['image'][:] = np.nan
  from lm import sharding  # pylint: disable=g-import-not-at-top
  new, metrics = trainer.train_step(state, sharding.to_global(batch, trainer.mesh))
  assert not bool(metrics['finite'])
  assert int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.model_state),
               before.model_state)


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / 'disk'
  mount.mkdir()
  size_kb = 2600  # One simple_cnn checkpoint (~1.5 MB with Adam state) fits; two don't.
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_kb}k', 'tmpfs', str(mount)],
                    capture_output=True).returncode:
    pytest.skip('needs root to mount a small tmpfs (a full disk)')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=False)


def test_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(small_disk):
  workdir = str(small_disk / 'run')
  trainer = train.Trainer(tiny_cnn(**{'train.log_every': 100}), workdir)
  with pytest.raises(ConfigError, match=r'failed .*No space left on device.*kept'):
    trainer.run()
  steps = train.checkpoint.manager(workdir).all_steps()
  assert steps == [5]
  state = train.Trainer(tiny_cnn(), workdir).initial_state()
  assert int(state.step) == 5 and all_finite(state)


def test_resharding_restores_identical_params(tmp_path):
  eight = tiny_cnn(**{'mesh.data': 2, 'mesh.fsdp': 4, 'train.steps': 5})
  train.Trainer(eight, str(tmp_path)).run()
  reference = jax.device_get(train.Trainer(eight, str(tmp_path)).initial_state().params)
  for devices, mesh in ((2, {'mesh.data': 1, 'mesh.fsdp': 2}), (1, {'mesh.data': 1})):
    config = tiny_cnn(**mesh, **{'train.steps': 8})
    trainer = train.Trainer(config, str(tmp_path), devices=jax.devices()[:devices])
    restored = jax.device_get(trainer.initial_state().params)
    jax.tree.map(np.testing.assert_array_equal, restored, reference)
  trainer.run()  # Training continues on the smaller mesh.
  assert trainer.ckpt.latest_step() == 8


def test_config_drift_lists_the_fields(tmp_path):
  train.Trainer(tiny_cnn(**{'train.steps': 2}), str(tmp_path)).run()
  changed = tiny_cnn(**{'train.steps': 4, 'optim.lr': 0.5, 'model.name': 'mlp'})
  with pytest.raises(ConfigError, match=r'model.name.*optim.lr|optim.lr.*model.name'):
    train.Trainer(changed, str(tmp_path))
  # More steps is a deliberate, allowed change.
  assert train.Trainer(tiny_cnn(**{'train.steps': 4}), str(tmp_path)).run()
  with_ignore = tiny_cnn(**{'train.steps': 6, 'optim.lr': 0.5})
  with_ignore.resume_mismatch = 'ignore'
  train.Trainer(with_ignore, str(tmp_path)).run()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  train.Trainer(tiny_cnn(**{'train.steps': 5}), str(tmp_path)).run()
  for path in glob.glob(str(tmp_path / 'checkpoints' / '5' / '**' / '*'), recursive=True):
    if os.path.isfile(path) and '/d/' in path:  # The array data files.
      with open(path, 'r+b') as f:
        f.write(b'garbage' * 100)
  with pytest.raises(ConfigError, match=r'checkpoint .*5 cannot be restored.*move it away'):
    train.Trainer(tiny_cnn(**{'train.steps': 5}), str(tmp_path)).initial_state()


def test_a_nan_update_from_finite_gradients_is_guarded(tmp_path):
  """lr=nan makes NaN params from finite loss and gradient; the guard checks the new state."""
  from lm import optim, sharding, steps  # pylint: disable=g-import-not-at-top
  config = tiny_cnn(**{'optim.name': 'sgd'})
  trainer = train.Trainer(config, str(tmp_path))
  state = trainer.initial_state()
  before = jax.device_get(state)
  config.optim.lr = float('nan')  # Past lm.main's check, as a schedule bug would be.
  nan_tx, _ = optim.make(config.optim, trainer.steps)
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=trainer.task.loss, tx=nan_tx,
                                               seed=0))
  new, metrics = step(state, sharding.to_global(trainer.task.data.train_batch(0), trainer.mesh))
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert not bool(metrics['finite'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.opt_state), before.opt_state)


def test_a_failed_resume_does_not_rewrite_config_json(tmp_path):
  train.Trainer(tiny_cnn(**{'train.steps': 5}), str(tmp_path)).run()
  saved = (tmp_path / 'config.json').read_text()
  wider = tiny_cnn(**{'train.steps': 8, 'model.name': 'resnet20'})
  wider.resume_mismatch = 'ignore'
  with pytest.raises(ConfigError, match=r"shapes differ from the config \(params/.*: .* in the "
                                        r'checkpoint vs .* here\)'):
    train.Trainer(wider, str(tmp_path)).run()
  assert (tmp_path / 'config.json').read_text() == saved
  # Without config.json there is nothing to check a resume against: refused, not trusted.
  os.remove(tmp_path / 'config.json')
  with pytest.raises(ConfigError, match='has checkpoints but no config.json'):
    train.Trainer(tiny_cnn(**{'train.steps': 8, 'optim.lr': 0.5}), str(tmp_path))


def test_a_second_rollback_at_one_step_gets_a_new_spare_batch(tmp_path):
  config = tiny_cnn(**{'train.on_nan': 'rollback', 'train.max_rollbacks': 5})
  trainer = train.Trainer(config, str(tmp_path))
  seen, original = [], trainer.task.data.train_batch
  bad = {7, 12}  # Step 7's own batch, and the first spare (12 steps: spares start at 12).

  def train_batch(index):
    seen.append(index)
    batch = original(index)
    if index in bad:
      batch = {**batch, 'image': np.full_like(batch['image'], np.inf)}
    return batch
  trainer.task.data.train_batch = train_batch
  trainer.run()
  assert json.load(open(tmp_path / 'skipped_steps.json')) == [7, 7]
  spares = [i for i in seen if i >= 12]
  assert spares[:2] == [12, 13], seen  # Not the spare that already failed.


def test_rollback_messages_say_what_happened(tmp_path, capsys):
  trainer = train.Trainer(tiny_cnn(**{'train.on_nan': 'rollback', 'train.max_rollbacks': 1}),
                          str(tmp_path))
  poison(trainer, 2)  # Before the first checkpoint (5).
  original = trainer.task.data.train_batch
  trainer.task.data.train_batch = lambda i: (
      {**original(i), 'image': np.full_like(original(i)['image'], np.inf)} if i >= 12
      else original(i))
  with pytest.raises(train.Diverged) as err:
    trainer.run()
  out = capsys.readouterr().out
  assert 'rolling back to the initial state (no checkpoint yet)' in out
  message = str(err.value)
  assert 'after 1 rollbacks (train.max_rollbacks=1)' in message
  assert 'raise train.max_rollbacks' in message and 'set train.on_nan=rollback' not in message
  assert 'there is no checkpoint yet' in message


def test_max_rollbacks_zero_names_it(tmp_path):
  config = tiny_cnn(**{'train.on_nan': 'rollback', 'train.max_rollbacks': 0})
  trainer = train.Trainer(config, str(tmp_path))
  poison(trainer, 3)
  with pytest.raises(train.Diverged, match=r'step 3 .*after 0 rollbacks \(train.max_rollbacks=0\)'):
    trainer.run()


def test_a_fresh_run_does_not_inherit_skipped_steps(tmp_path):
  (tmp_path / 'skipped_steps.json').write_text('[3]')  # Left by an earlier run, no checkpoint.
  trainer = train.Trainer(tiny_cnn(**{'train.steps': 4}), str(tmp_path))
  seen, original = [], trainer.task.data.train_batch
  trainer.task.data.train_batch = lambda i: seen.append(i) or original(i)
  trainer.run()
  assert seen == [0, 1, 2, 3] and not (tmp_path / 'skipped_steps.json').exists()
