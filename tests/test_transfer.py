"""Starting from another run: what loads, what is new, what is refused; freezing and lr groups."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from lm import config as config_lib
from lm import optim
from lm import train
from lm.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, '..', 'shared')
TINY_LM = os.path.join(HERE, 'tiny_config.py')
TINY_CNN = os.path.join(HERE, 'tiny_cnn_config.py')


def cfg(path, **overrides):
  c = config_lib.load(path)
  for key, value in overrides.items():
    *sections, field = key.split('.')
    node = c
    for s in sections:
      node = node[s]
    node[field] = value
  return c


def text_config(**overrides):
  """A seconds-long SMS spam classifier."""
  c = config_lib.load(os.path.join(ROOT, 'experiments', 'sms_spam.py'))
  c.data.update(data_dir=os.path.join(SHARED, 'text', 'sms_spam'), tokenizer='byte', max_len=32)
  c.model.update(num_layers=2, num_heads=2, d_model=32, seq_len=32)
  c.train.update(epochs=0, steps=6, batch_size=8, eval_every=0, eval_every_epochs=0,
                 log_every=3)
  c.data.eval_batch_size = 512
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny byte-level LM (seq_len 32, as text_config's classifier), trained a few steps."""
  workdir = str(tmp_path_factory.mktemp('pre'))
  c = cfg(TINY_LM, **{'data.tokenizer': 'byte', 'model.seq_len': 32, 'train.steps': 6,
                      'train.eval_every': 0})
  train.Trainer(c, workdir).run()
  return workdir


def params_of(workdir, config):
  trainer = train.Trainer(config, workdir, read_only=True)
  return jax.device_get(trainer.initial_state().params)


def test_lm_trunk_seeds_the_classifier_and_the_report_says_so(pretrained, tmp_path, capsys):
  source = params_of(pretrained, cfg(TINY_LM, **{'data.tokenizer': 'byte',
                                                 'model.seq_len': 32}))
  config = text_config(**{'init.workdir': pretrained, 'model.d_model': 64})
  trainer = train.Trainer(config, str(tmp_path))
  assert config.model.d_model == 32  # The source's trunk hyperparameters are taken.
  state = jax.device_get(trainer.initial_state())
  out = capsys.readouterr().out
  assert 'init: model.d_model=32 from' in ''.join(trainer.init_notes)
  assert 'init: loaded 15 arrays from' in out
  assert 'init: new (initialised here): params/cls_head, params/cls_head_bias' in out
  for name in ('block_0', 'block_1', 'norm_final', 'pos_embedding'):
    jax.tree.map(np.testing.assert_array_equal, state.params[name], source[name])
  # The classifier's [PAD] and [CLS] rows extend the byte embedding; the 256 bytes load.
  assert state.params['embedding'].shape == (258, 32)
  np.testing.assert_array_equal(state.params['embedding'][:256], source['embedding'])
  result = trainer.run()
  assert np.isfinite(result['test/loss'])


def test_the_source_tokenizer_is_reused(pretrained, tmp_path, capsys):
  config = text_config(**{'init.workdir': pretrained, 'data.tokenizer': 'word'})
  trainer = train.Trainer(config, str(tmp_path))
  assert config.data.tokenizer == 'byte' and trainer.task.data.vocab_size == 258
  assert any("data.tokenizer='byte' from" in n for n in trainer.init_notes)


def test_a_mismatched_tree_is_refused_naming_the_path_and_shapes(pretrained, tmp_path):
  config = cfg(TINY_LM, **{'model.vocab_size': 200, 'init.workdir': pretrained})
  with pytest.raises(ConfigError, match=r'init: params/embedding is \(256, 32\) in .* but '
                                        r'params/embedding is \(200, 32\) here'):
    train.Trainer(config, str(tmp_path)).initial_state()
  config.init.skip = 'embedding'
  state = train.Trainer(config, str(tmp_path)).initial_state()  # Named: then it is allowed.
  assert state.params['embedding'].shape == (200, 32)


def test_an_unused_source_leaf_is_refused_unless_skipped(tmp_path):
  source = str(tmp_path / 'untied')
  c = cfg(TINY_LM, **{'data.tokenizer': 'byte', 'model.seq_len': 32, 'train.steps': 2,
                      'train.eval_every': 0, 'model.tie_embeddings': False})
  train.Trainer(c, source).run()
  with pytest.raises(ConfigError, match=r"params/head has no place in this model"):
    train.Trainer(text_config(**{'init.workdir': source}), str(tmp_path / 'a')).initial_state()
  ok = text_config(**{'init.workdir': source, 'init.skip': '^params/head$'})
  train.Trainer(ok, str(tmp_path / 'b')).initial_state()


@pytest.mark.parametrize('bad,needle', [
    ('/does/not/exist', 'does not exist'),
    ('EMPTY', 'has no checkpoint'),
])
def test_bad_init_workdir_is_one_line_and_exit_2(tmp_path, bad, needle):
  if bad == 'EMPTY':
    bad = str(tmp_path / 'empty')
    os.makedirs(bad)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', f'--config={TINY_LM}', f'--workdir={tmp_path / "run"}',
       f'--config.init.workdir={bad}'], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert needle in result.stderr
  assert not (tmp_path / 'run').exists()


def test_cnn_weights_and_batchnorm_statistics_load(tmp_path):
  source = str(tmp_path / 'cnn')
  base = {'model.name': 'resnet20', 'model.width': 0.25, 'train.steps': 3,
          'train.checkpoint_every': 3}
  train.Trainer(cfg(TINY_CNN, **base), source).run()
  saved = train.Trainer(cfg(TINY_CNN, **base), source, read_only=True).initial_state()
  # A new run with other hyperparameters starts from those weights and statistics.
  config = cfg(TINY_CNN, **{'init.workdir': source, 'model.name': 'simple_cnn',
                            'optim.lr': 1e-2})
  state = train.Trainer(config, str(tmp_path / 'ft')).initial_state()
  assert config.model.name == 'resnet20'
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state),
               jax.device_get(saved.model_state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(saved.params))
  assert int(state.step) == 0  # Weights only: not the step, not the optimizer state.


def test_frozen_parameters_do_not_move_and_have_no_optimizer_state(pretrained, tmp_path):
  config = text_config(**{'init.workdir': pretrained, 'optim.freeze': '^(block_|embedding|pos_)',
                          'train.steps': 4})
  trainer = train.Trainer(config, str(tmp_path))
  before = jax.device_get(trainer.initial_state().params)
  trainer.run()
  after = jax.device_get(train.Trainer(config, str(tmp_path), read_only=True)
                         .initial_state().params)
  for name in ('block_0', 'embedding', 'pos_embedding'):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(after['cls_head'], before['cls_head'])
  # Adam's moments exist for the trainable parameters only.
  moments = [x for x in jax.tree.leaves(trainer.abstract_state.opt_state) if x.ndim]
  trainable = (config.model.d_model * 2 + 2 + config.model.d_model)  # cls_head, bias, norm
  assert sum(x.size for x in moments) == 2 * sum(
      x.size for k, x in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]
      if not optim.path_str(k).startswith(('block_', 'embedding', 'pos_'))), trainable


def test_lr_groups_and_unfreezing():
  c = config_lib.get_config().optim
  c.update(name='sgd', lr=1.0, schedule='constant', warmup_steps=0, momentum=0.0,
           weight_decay=0.0, clip_norm=0.0, lr_mults='^a=0.5,^b=0')
  params = {'a': np.ones(2, np.float32), 'b': np.ones(2, np.float32),
            'c': np.ones(2, np.float32)}
  tx, _ = optim.make(c, steps=10)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert [float(updates[k][0]) for k in 'abc'] == [-0.5, 0.0, -1.0]
  c.update(lr_mults='', freeze='^a', unfreeze_at=2)
  tx, _ = optim.make(c, steps=10)
  state = tx.init(params)
  moves = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    moves.append(float(updates['a'][0]))
  assert moves == [0.0, 0.0, -1.0]


def test_layer_decay_scales_each_block():
  c = config_lib.get_config().optim
  c.update(name='sgd', lr=1.0, schedule='constant', warmup_steps=0, momentum=0.0,
           weight_decay=0.0, clip_norm=0.0, layer_decay=0.5)
  params = {'embedding': np.ones(1, np.float32), 'block_0': {'w': np.ones(1, np.float32)},
            'block_1': {'w': np.ones(1, np.float32)}, 'cls_head': np.ones(1, np.float32)}
  tx, _ = optim.make(c, steps=10, num_layers=2)
  updates, _ = tx.update(jax.tree.map(np.ones_like, params), tx.init(params), params)
  got = {k: float(jax.tree.leaves(v)[0][0]) for k, v in updates.items()}
  assert got == {'embedding': -0.125, 'block_0': -0.25, 'block_1': -0.5, 'cls_head': -1.0}


def test_layer_decay_refuses_the_stacked_layers_of_scan_layers():
  c = config_lib.get_config().optim
  c.update(layer_decay=0.5)
  params = {'embedding': np.ones(1, np.float32), 'blocks': {'w': np.ones((2, 1), np.float32)}}
  tx, _ = optim.make(c, steps=10, num_layers=2)
  with pytest.raises(ConfigError, match='model.scan_layers=False'):
    tx.init(params)


@pytest.mark.parametrize('field,value,needle', [
    ('freeze', 'no_such_param', 'matches no parameter'),
    ('freeze', '(unclosed', 'not a valid regex'),
    ('lr_mults', 'block_=x', "not 'regex=multiplier'"),
])
def test_bad_freeze_and_lr_mults_are_clear_errors(tmp_path, field, value, needle):
  config = cfg(TINY_LM, **{f'optim.{field}': value})
  with pytest.raises(ConfigError, match=needle):
    train.Trainer(config, str(tmp_path))


def test_optax_groups_keep_sharding_rules(tmp_path):
  """Grouped optimizer state is sharded like the params it belongs to (8-device mesh)."""
  config = cfg(TINY_LM, **{'optim.freeze': '^embedding', 'mesh.data': 1, 'mesh.fsdp': 8})
  trainer = train.Trainer(config, str(tmp_path))
  specs = {str(s.spec) for s in jax.tree.leaves(trainer.state_shardings.opt_state)}
  assert any('fsdp' in s for s in specs)
  assert isinstance(trainer.tx, optax.GradientTransformation)


def test_text_pretrain_then_sms_spam_fine_tunes_from_it(tmp_path, monkeypatch):
  """The contract's two commands, shrunk: experiments/text_pretrain.py on its default corpus
  (read from the repository root, as the command runs), then sms_spam.py from it."""
  monkeypatch.chdir(ROOT)
  pre = str(tmp_path / 'pre')
  c = cfg(os.path.join(ROOT, 'experiments', 'text_pretrain.py'),
          **{'data.max_bytes': 200_000, 'data.vocab_size': 500, 'model.num_layers': 1,
             'model.d_model': 32, 'model.num_heads': 2, 'model.seq_len': 32,
             'train.steps': 3, 'train.eval_every': 3, 'train.eval_batches': 2,
             'train.checkpoint_every': 3})
  assert np.isfinite(train.Trainer(c, pre).run()['eval/loss'])
  ft = text_config(**{'init.workdir': pre, 'data.data_dir': os.path.join(SHARED, 'text',
                                                                          'sms_spam')})
  trainer = train.Trainer(ft, str(tmp_path / 'ft'))
  # The pretraining run's trunk and SentencePiece model are taken, whatever sms_spam.py says.
  assert (ft.model.num_layers, ft.model.d_model, ft.data.tokenizer) == (1, 32, 'sentencepiece')
  assert trainer.task.data.vocab_size == 502  # Its 500 pieces, then [PAD] and [CLS].
  source = params_of(pre, c)
  state = jax.device_get(trainer.initial_state())
  jax.tree.map(np.testing.assert_array_equal, state.params['block_0'], source['block_0'])
  np.testing.assert_array_equal(state.params['embedding'][:500], source['embedding'])
  assert 0.0 <= trainer.run()['test/f1'] <= 1.0
