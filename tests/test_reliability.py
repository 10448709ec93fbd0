"""Injected faults: divergence, a full disk, concurrent runs, config drift, resharding."""

import errno
import glob
import json
import os
import re
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


def keep_saves(trainer) -> dict:
  """{step: the state as it was handed to the checkpoint}: the reference a restore must equal."""
  saved, save = {}, trainer._save

  def saving(step, state):
    saved[step] = jax.device_get(state)
    save(step, state)
  trainer._save = saving
  return saved


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


class Killed(Exception):
  """Stands for a SIGKILL: the run dies where it is, saving nothing."""


def test_a_restart_after_a_rollback_trains_on_the_same_spare_batch(tmp_path, capsys):
  """Killed after rolling back step 7 but before the next checkpoint, the run restarts from
  checkpoint 5; skipped_steps.json makes it train step 7 on the spare batch at once (not on the
  bad batch again), and it ends bit-identical to a run that was never interrupted."""
  config = tiny_cnn(**{'train.on_nan': 'rollback'})  # 12 steps, checkpoints at 5, 10, 12.

  def trainer_with_bad_batch(workdir, kill_at=None):
    trainer = train.Trainer(config, str(workdir))
    poison(trainer, 7)
    seen, poisoned = [], trainer.task.data.train_batch

    def train_batch(index):
      if index == kill_at and 12 in seen:  # After the rollback, before checkpoint 10.
        raise Killed
      seen.append(index)
      return poisoned(index)
    trainer.task.data.train_batch = train_batch
    return trainer, seen

  straight, _ = trainer_with_bad_batch(tmp_path / 'straight')
  reference = keep_saves(straight)
  straight.run()
  assert json.load(open(tmp_path / 'straight' / 'skipped_steps.json')) == [7]

  killed, seen = trainer_with_bad_batch(tmp_path / 'killed', kill_at=9)
  with pytest.raises(Killed):
    killed.run()
  assert 12 in seen and killed.ckpt.all_steps() == [5]
  assert json.load(open(tmp_path / 'killed' / 'skipped_steps.json')) == [7]
  capsys.readouterr()

  restarted, seen = trainer_with_bad_batch(tmp_path / 'killed')
  saved = keep_saves(restarted)
  restarted.run()
  assert seen == [5, 6, 12, 8, 9, 10, 11]  # Step 7 on the spare batch; batch 7 never again.
  assert 'rolling back' not in capsys.readouterr().out
  assert json.load(open(tmp_path / 'killed' / 'skipped_steps.json')) == [7]
  jax.tree.map(np.testing.assert_array_equal, saved[12], reference[12])


def test_nonfinite_step_leaves_the_state_unchanged(tmp_path):
  """All of it: params, optimizer state (Adam's moments and count) and the EMA, not only the
  params; a NaN gradient let into Adam's moments poisons every later step."""
  trainer = train.Trainer(tiny_cnn(**{'train.ema_decay': 0.9}), str(tmp_path))
  state = trainer.initial_state()
  from lm import sharding  # pylint: disable=g-import-not-at-top
  # One finite step first, so that the optimizer state and the EMA are not their initial
  # values (a guard that reset them would pass otherwise).
  state, metrics = trainer.train_step(
      state, sharding.to_global(trainer.task.data.train_batch(0), trainer.mesh))
  assert bool(metrics['finite'])
  before = jax.device_get(state)
  assert before.ema_params is not None
  batch = trainer.task.data.train_batch(1)
  batch['image'][:] = np.nan
  new, metrics = trainer.train_step(state, sharding.to_global(batch, trainer.mesh))
  assert not bool(metrics['finite'])
  new = jax.device_get(new)
  assert int(new.step) == 2
  jax.tree.map(np.testing.assert_array_equal, new.replace(step=before.step), before)


def test_nonfinite_step_keeps_the_model_state():
  """The guard also keeps non-trainable state (BatchNorm statistics) that a NaN batch moves."""
  import optax  # pylint: disable=g-import-not-at-top
  from lm import steps  # pylint: disable=g-import-not-at-top

  def loss_fn(params, model_state, batch, rng):
    del rng
    mean = 0.9 * model_state['stats']['mean'] + 0.1 * batch['x'].mean()
    loss = jnp.mean((batch['x'] * params['w'] - 1.0) ** 2)
    return loss, {'model_state': {'stats': {'mean': mean}}, 'metrics': {}}

  tx = optax.adam(0.1)
  params = {'w': jnp.ones(3)}
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           model_state={'stats': {'mean': jnp.ones(())}}, ema_params=params)
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=loss_fn, tx=tx, seed=0,
                                               ema_decay=0.5))
  state, _ = step(state, {'x': jnp.full((4, 3), 2.0)})
  before = jax.device_get(state)
  new, metrics = step(state, {'x': jnp.full((4, 3), jnp.nan)})
  assert not bool(metrics['finite'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new).replace(step=before.step),
               before)


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
  with pytest.raises(ConfigError, match=r'failed .*No space left on device.*kept') as error:
    trainer.run()
  steps = train.checkpoint.manager(workdir).all_steps()
  assert steps == [5]
  # What the message says is kept is what is on disk, whichever write met the full disk
  # first (a metrics write can, while step 10's save is still in flight).
  assert re.search(r'complete checkpoints \[([\d, ]*)\]', str(error.value))[1] == '5'
  state = train.Trainer(tiny_cnn(), workdir).initial_state()
  assert int(state.step) == 5 and all_finite(state)


class _FullDiskFlush:
  """An event file whose writes are buffered and whose last flush meets a full disk."""

  def add_scalar(self, *args):
    pass

  def close(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _metrics_meet_a_full_disk(monkeypatch, from_step):
  """Metrics writes fail from `from_step` on (never with None), and so does the last flush."""

  class FullDiskWriter(train.metrics_lib.Writer):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._tb.close()
      self._tb = _FullDiskFlush()

    def write(self, step, metrics):
      if from_step is not None and step >= from_step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      super().write(step, metrics)

  monkeypatch.setattr(train.metrics_lib, 'Writer', FullDiskWriter)


def _kept(kept):
  return (r'^writing metrics failed \(No space left on device\); '
          rf'the complete checkpoints \[{kept}\] in ')


@pytest.mark.parametrize('full_from_step, kept', [(11, '5, 10'), (None, '5, 10, 12')])
def test_a_full_disk_is_reported_once_and_not_masked_by_the_last_flush(
    tmp_path, monkeypatch, full_from_step, kept):
  """A metrics write meets a full disk (or only the writer's last flush does, at the end):
  the run stops with the one-line error, not with the flush's OSError raised over it."""
  _metrics_meet_a_full_disk(monkeypatch, full_from_step)
  with pytest.raises(ConfigError, match=_kept(kept)):
    train.Trainer(tiny_cnn(), str(tmp_path)).run()
  assert ', '.join(map(str, train.checkpoint.manager(str(tmp_path)).all_steps())) == kept


def test_a_metrics_write_on_a_full_disk_does_not_count_the_save_in_flight(small_disk,
                                                                          monkeypatch):
  """Step 10's save is still being written (and will not fit) when step 11's metrics meet the
  full disk: the error lists step 5 only, the one checkpoint that is whole."""
  _metrics_meet_a_full_disk(monkeypatch, 11)
  workdir = str(small_disk / 'run')
  with pytest.raises(ConfigError, match=_kept('5')):
    train.Trainer(tiny_cnn(), workdir).run()
  assert train.checkpoint.manager(workdir).all_steps() == [5]


def test_resharding_restores_identical_params(tmp_path):
  eight = tiny_cnn(**{'mesh.data': 2, 'mesh.fsdp': 4, 'train.steps': 5})
  writer = train.Trainer(eight, str(tmp_path))
  saved = keep_saves(writer)
  writer.run()
  # The reference is the state the 8-device run saved, not another restore of it.
  reference = saved[5]
  assert int(reference.step) == 5
  for devices, mesh in ((2, {'mesh.data': 1, 'mesh.fsdp': 2}), (1, {'mesh.data': 1})):
    config = tiny_cnn(**mesh, **{'train.steps': 8})
    trainer = train.Trainer(config, str(tmp_path), devices=jax.devices()[:devices])
    restored = trainer.initial_state()
    assert {d.id for d in jax.tree.leaves(restored.params)[0].sharding.device_set} == {
        d.id for d in jax.devices()[:devices]}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), reference)
  trainer.run()  # Training continues on the smaller mesh.
  assert trainer.ckpt.latest_step() == 8


# Fields a resumed run may change without resume_mismatch=ignore: the length of the run,
# logging, evaluation and checkpoint intervals, divergence handling, the data dir, the eval and
# test splits (evaluating elsewhere is not training differently), the mesh and how the same
# model is computed (remat, attention kernel, prefetch). Written out here, not read from
# train.py, so that a field added there is a change this test has to be told about.
RESUMABLE = ('train.steps', 'train.log_every', 'train.eval_every', 'train.eval_every_epochs',
             'train.eval_batches', 'train.checkpoint_every', 'train.keep_checkpoints',
             'train.profile', 'train.on_nan', 'train.max_rollbacks', 'data.data_dir',
             'data.eval_split', 'data.test_split', 'mesh.', 'resume_mismatch',
             'model.remat', 'model.attention', 'data.prefetch')

# A valid other value for each field whose change must be refused; numbers and booleans
# without an entry get one below.
OTHER_VALUE = {
    'task': 'classify_text', 'data.name': 'tiny_shakespeare', 'data.text_key': 'sentence',
    'data.train_split': 'train[:200]', 'data.tokenizer': 'byte',
    'data.tokenizer_path': '/tmp/sp.model', 'data.crop_padding': 'reflect',
    'data.positive_label': 'cat', 'data.label_key': 'category', 'model.name': 'mlp',
    'model.pos': 'rope', 'model.norm': 'rmsnorm', 'model.mlp': 'swiglu',
    'model.dtype': 'bfloat16', 'model.pool': 'cls', 'train.loss': 'focal',
    'train.class_weights': 'balanced', 'optim.name': 'sgd', 'optim.schedule': 'cosine',
    'optim.step_boundaries': (0.25, 0.75), 'seed': 1, 'optim.b1': 0.8, 'optim.b2': 0.98,
    'optim.momentum': 0.8, 'train.ema_decay': 0.99, 'data.val_fraction': 0.1,
    'train.label_smoothing': 0.1, 'train.batch_size': 16, 'train.grad_accum_steps': 2,
    'model.dropout': 0.1, 'model.head_dropout': 0.1, 'data.max_len': 32,
    'data.max_bytes': 1_000_000, 'model.mlp_dim': 64, 'model.vocab_size': 256,
    'model.hidden': (64,), 'optim.freeze': 'Conv_0', 'optim.lr_mults': 'Dense_0=0.1',
    'init.skip': 'Dense_0', 'data.alpha': 'channel', 'data.image_key': 'picture',
    'model.fusion': 'average', 'model.image_model': 'mlp', 'prune.params': 'Conv_0',
    'prune.pattern': '2:4', 'prune.scope': 'global', 'prune.skip': 'Conv_0',
    'quant.export': 'int8',
}
# Fields refused before the drift check, with their own message.
OWN_REFUSAL = {'quant.int8': 'quant.int8 is for evaluation',
               'quant.export': 'holds an int8 export of weights'}


def _fields(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _fields(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _other_value(field, value):
  if field in OTHER_VALUE:
    return OTHER_VALUE[field]
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 if value else 1
  raise AssertionError(f'give {field} another valid value in OTHER_VALUE')


REFUSED = [f for f, _ in _fields(tiny_cnn()) if not f.startswith(RESUMABLE)]


def test_config_drift_allows_the_documented_changes(trained_workdir, capsys):
  changes = {'train.steps': 3, 'train.log_every': 2, 'train.eval_every': 2,
             'train.eval_every_epochs': 0.5, 'train.eval_batches': 3,
             'train.checkpoint_every': 2, 'train.keep_checkpoints': 2, 'train.profile': True,
             'train.on_nan': 'rollback', 'train.max_rollbacks': 5,
             'data.data_dir': os.path.join(TFDS, ''), 'data.eval_split': 'test[:16]',
             'data.test_split': 'test[:8]', 'mesh.cpu_devices': 1}
  assert all(f.startswith(RESUMABLE) for f in changes)
  train.Trainer(tiny_cnn(**changes), str(trained_workdir), devices=jax.devices()[:1])
  out = capsys.readouterr().out
  for field in changes:
    assert f'resuming with a changed config: {field}: ' in out


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A workdir with the tiny CNN's config.json and a checkpoint: what the drift check reads."""
  workdir = tmp_path_factory.mktemp('drift')
  train.Trainer(tiny_cnn(**{'train.steps': 1}), str(workdir), devices=jax.devices()[:1]).run()
  return workdir


@pytest.mark.parametrize('field', REFUSED)
def test_config_drift_refuses_every_field_that_changes_the_run(trained_workdir, field):
  config = tiny_cnn(**{'train.steps': 2})
  section, _, name = field.rpartition('.')
  target = config[section] if section else config
  old = target[name]
  # init.workdir must name a run with a checkpoint; the trained one is such a run.
  new = (str(trained_workdir) if field in ('init.workdir', 'distill.teacher_workdir') else
         _other_value(field, old))
  assert new != old
  target[name] = new
  config_lib.check_values(config)  # A valid value: refused for the change, not the value.
  drift = rf'was trained with a different config \((.*; )?{re.escape(field)}: '
  with pytest.raises(ConfigError, match=re.escape(OWN_REFUSAL[field]) if field in OWN_REFUSAL
                     else drift):
    train.Trainer(config, str(trained_workdir), devices=jax.devices()[:1])


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


def test_the_finiteness_check_reads_each_shard_and_gathers_nothing(monkeypatch):
  """One reduction per bucket of each device's own shards: every leaf, dtype and shard is
  seen (a NaN or inf anywhere is caught), and the sharded leaves are never gathered."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from lm import steps  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(steps, '_CHECK_BUCKET', 40)  # Several buckets per device.
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {'w': P('fsdp', None), 'v': P(None, ('data', 'fsdp')), 'b': P(), 'count': P()}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tree = {'w': jnp.ones((8, 32)), 'v': jnp.ones((4, 64)), 'b': jnp.ones(16, jnp.bfloat16),
          'count': jnp.array(3)}
  tree = jax.device_put(tree, shardings)
  check = jax.jit(lambda t: steps.all_finite(t, shardings))
  assert bool(check(tree)) and bool(steps.all_finite(tree))
  assert 'all-gather' not in check.lower(tree).compile().as_text()
  for key, index, bad in [('w', (7, 31), np.nan), ('w', (0, 0), np.inf), ('v', (3, 63), -np.inf),
                          ('v', (0, 17), np.nan), ('b', (15,), np.inf)]:
    host = np.array(tree[key], dtype=np.float32)
    host[index] = bad
    broken = {**tree, key: jax.device_put(host.astype(tree[key].dtype), shardings[key])}
    assert not bool(check(broken)), (key, index)
    assert not bool(steps.all_finite(broken)), (key, index)


def test_the_trainer_checks_finiteness_on_each_devices_own_shards(tmp_path):
  """The jitted step hands the state's shardings to the guard, which then runs as a shard_map
  (a manual computation); without them it would gather every fsdp-sharded leaf each step."""
  trainer = train.Trainer(tiny_cnn(**{'mesh.data': 2, 'mesh.fsdp': 4}), str(tmp_path))
  lowered = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch())
  assert lowered.as_text().count('manual_computation') == 1


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
  """With on_nan=rollback and max_rollbacks=0 the run gives up at the first bad step, and the
  message says so, not 'train.on_nan=stop' (what it said when it tested rollbacks > 1)."""
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
