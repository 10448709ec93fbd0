"""Image + text classification: manifests, images, batches (lm/multimodal.py), the fusion
models (lm/fusion.py), the task through the trainer and the command line.

Shape key as in lm/fusion.py.
"""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from lm import cnn
from lm import config as config_lib
from lm import fusion
from lm import model as model_lib
from lm import multimodal
from lm import shapes
from lm import train
from lm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220)}


def _png(path, colour, size=16, alpha=255):
  """A disc of `colour` on a transparent background whose hidden pixels are black."""
  yy, xx = np.mgrid[:size, :size]
  inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2
  rgba = np.zeros((size, size, 4), np.uint8)
  rgba[inside] = (*colour, alpha)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rgba, 'RGBA').save(path)


def _write(directory, split, rows):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f'{split}.jsonl'), 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')


def _rows(n, prefix='', label_key='label', image_key='image', text_key='text', seed=0):
  """n examples, twins sharing a text (two vendors' drawings, as in the emoji data); the
  label is the colour, which both the picture and the text's word show."""
  colours = np.random.default_rng(seed).choice(sorted(COLOURS), (n + 1) // 2)
  return [{image_key: f'images/{"ab"[i % 2]}/{prefix}{i // 2}.png',
           text_key: f'{colours[i // 2]} thing number {prefix}{i // 2}',
           label_key: str(colours[i // 2])} for i in range(n)]


def _dataset(directory, n_train=32, n_test=12, splits=('train', 'test'), **keys):
  for split, n in (('train', n_train), ('test', n_test)):
    if split not in splits:
      continue
    rows = _rows(n, prefix=split[:2], seed=len(split), **keys)
    _write(directory, split, rows)
    for row in rows:
      label = row[keys.get('label_key', 'label')]
      _png(os.path.join(directory, row[keys.get('image_key', 'image')]), COLOURS[label])
  return str(directory)


def _config(data_dir, **data):
  c = config_lib.get_config()
  c.task = 'classify_multimodal'
  c.data.update(name='', data_dir=str(data_dir), tokenizer='word', max_len=8, image_size=16,
                val_fraction=0.0, eval_split='test', test_split='', augment=False, flip=False)
  c.data.update(**data)
  c.model.update(fusion='concat', image_model='mlp', num_classes=3, num_layers=1,
                 num_heads=2, d_model=16, seq_len=8, causal=False, fusion_dim=16)
  c.train.update(batch_size=8, steps=30, log_every=5, eval_every=0, checkpoint_every=100)
  c.optim.update(name='adam', lr=3e-3, schedule='constant', warmup_steps=0, weight_decay=0.0)
  return c


def _error(fn, *needles):
  with pytest.raises(ConfigError) as e:
    fn()
  message = str(e.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, message


# --- manifests and images ------------------------------------------------------------------


def test_manifest_keys_are_configurable_and_paths_relative_to_it(tmp_path):
  keys = dict(image_key='picture', text_key='caption', label_key='colour')
  _dataset(tmp_path, **keys)
  c = _config(tmp_path, **keys)
  m = multimodal.read_manifest(c.data, 'train')
  assert len(m.image_paths) == 32 and m.examples.lines[:2] == [1, 2]
  assert m.image_paths[0] == os.path.join(str(tmp_path), 'images', 'a', 'tr0.png')
  assert m.examples.texts[0].endswith('thing number tr0')
  assert m.examples.labels[0] in COLOURS
  data = multimodal.make(c)
  assert data.class_names == ('blue', 'green', 'red')


@pytest.mark.parametrize('break_it, needles', [
    (lambda d: _write(d, 'train', _rows(4) + [{'image': 'images/a/tr0.png', 'text': 'red'}]),
     ["train.jsonl' line 5 has no 'label'", '--config.data.label_key']),
    (lambda d: _write(d, 'train', _rows(4) + [{'text': 'red', 'label': 'red'}]),
     ["train.jsonl' line 5 has no 'image'", '--config.data.image_key']),
    (lambda d: _write(d, 'train', _rows(4) + ['{"image": "x.png", ']),
     ["train.jsonl' line 5: not JSON"]),
    (lambda d: os.remove(os.path.join(d, 'images', 'b', 'tr1.png')),
     ["train.jsonl' line 4: image", 'tr1.png', 'does not exist']),
    (lambda d: open(os.path.join(d, 'images', 'a', 'tr1.png'), 'wb').write(b'not a png'),
     ["train.jsonl' line 3: image", 'tr1.png', 'does not decode']),
    (lambda d: _write(d, 'test', [{'image': 'images/a/te0.png', 'text': 'x', 'label': 'mauve'}]),
     ["test.jsonl' line 1: label 'mauve' is not one of the 3 training labels"]),
])
def test_bad_input_is_one_line_naming_file_line_and_fix(tmp_path, break_it, needles):
  _dataset(tmp_path)
  break_it(str(tmp_path))
  _error(lambda: multimodal.make(_config(tmp_path)), *needles)


def test_missing_split_lists_the_manifests_the_dir_has(tmp_path):
  _dataset(tmp_path)
  _error(lambda: multimodal.make(_config(tmp_path, eval_split='validation')),
         'no validation.jsonl', 'test.jsonl, train.jsonl', 'val_fraction')


def test_alpha_composites_onto_white_or_is_kept_as_a_channel(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (0, 0, 0, 0)          # Transparent (its black RGB must not show).
  rgba[0, 1] = (255, 0, 0, 255)      # Opaque red.
  rgba[1, 0] = (0, 0, 255, 128)      # Half-transparent blue.
  rgba[1, 1] = (10, 20, 30, 255)
  path = str(tmp_path / 'x.png')
  Image.fromarray(rgba, 'RGBA').save(path)
  white = multimodal.load_image(path, 0, 'white')
  assert white.shape == (2, 2, 3) and white.dtype == np.uint8
  np.testing.assert_array_equal(white[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(white[0, 1], (255, 0, 0))
  np.testing.assert_allclose(white[1, 0], (127, 127, 255), atol=1)
  channel = multimodal.load_image(path, 0, 'channel')
  assert channel.shape == (2, 2, 4)
  np.testing.assert_array_equal(channel[..., :3], white)
  np.testing.assert_array_equal(channel[..., 3], [[0, 255], [128, 255]])
  # Resized with the alpha premultiplied: the hidden black does not darken the average.
  one = multimodal.load_image(path, 1, 'white')
  assert one.shape == (1, 1, 3)
  np.testing.assert_allclose(one[0, 0], np.mean([white[i, j] for i in (0, 1) for j in (0, 1)],
                                                axis=0), atol=2)


def test_channel_alpha_makes_four_channel_batches(tmp_path):
  _dataset(tmp_path)
  data = multimodal.make(_config(tmp_path, alpha='channel', image_size=8))
  assert data.train_batch(0)['image'].shape == (8, 8, 8, 4)


# --- batches -------------------------------------------------------------------------------


def test_batches_have_the_named_keys_and_are_a_pure_function_of_the_step(tmp_path):
  _dataset(tmp_path)
  c = _config(tmp_path, augment=True, flip=True)
  a, b = multimodal.make(c), multimodal.make(c)
  batch = a.train_batch(5)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      'image': ((8, 16, 16, 3), 'float32'), 'tokens': ((8, 8), 'int32'),
      'token_mask': ((8, 8), 'bool'), 'label': ((8,), 'int32'), 'valid': ((8,), 'float32')}
  for key in batch:
    np.testing.assert_array_equal(batch[key], b.train_batch(5)[key])
  assert not np.array_equal(batch['image'], a.train_batch(6)['image'])
  # Four words: 'red thing number tr3' and so on.
  assert (batch['token_mask'].sum(1) == 4).all()


def test_two_processes_rows_concatenate_to_the_one_process_batch(tmp_path):
  _dataset(tmp_path)
  c = _config(tmp_path, augment=True, flip=True)
  whole = multimodal.make(c).train_batch(7)
  parts = [multimodal.make(c, process_index=i, process_count=2).train_batch(7) for i in (0, 1)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_validation_holds_out_whole_texts_and_eval_pads_with_invalid_rows(tmp_path):
  _dataset(tmp_path, n_train=40)
  c = _config(tmp_path, val_fraction=0.25, eval_split='validation')
  texts = np.array(multimodal.read_manifest(c.data, 'train').examples.texts)
  train_rows, val_rows = multimodal.hold_out_groups(texts, 0.25)
  assert len(set(texts[val_rows])) == 5 and len(val_rows) == 10  # 5 of 20 twin pairs, whole.
  assert not set(texts[train_rows]) & set(texts[val_rows])
  data = multimodal.make(c)
  assert data.stats['num_train'] == 30
  batches = data.eval_batches('validation')
  valid = np.concatenate([b['valid'] for b in batches])
  assert len(valid) % 8 == 0 and valid.sum() == 10
  assert all((b['image'][b['valid'] == 0] == 0).all() for b in batches)


# --- models --------------------------------------------------------------------------------


def _model(fusion_name, image_model='mlp', modality_dropout=0.0, **kw):
  c = _config('.').model
  c.update(fusion=fusion_name, image_model=image_model, modality_dropout=modality_dropout, **kw)
  return fusion.FusionClassifier.from_config(c, vocab_size=13)


def _inputs(seed=0, size=16):
  rng = np.random.default_rng(seed)
  image = jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(3, 13, (4, 8)), jnp.int32)
  mask = jnp.arange(8) < jnp.array([8, 5, 3, 1])[:, None]
  return image, tokens, mask


@pytest.mark.parametrize('fusion_name', fusion.FUSIONS)
def test_each_fusion_gives_logits_and_single_modalities_ignore_the_other(fusion_name):
  model = _model(fusion_name, image_model='simple_cnn')
  image, tokens, mask = _inputs(size=32)
  other_image, other_tokens, _ = _inputs(seed=1, size=32)

  @jax.jit
  def run():
    variables = model.init(jax.random.key(0), image, tokens, mask)
    out = lambda i, t: model.apply(variables, i, t, mask)
    return out(image, tokens), out(image, other_tokens), out(other_image, tokens)

  logits, new_text, new_image = run()
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  text_changes = np.abs(new_text - logits).max() > 1e-5
  image_changes = np.abs(new_image - logits).max() > 1e-5
  assert text_changes == (fusion_name != 'image_only')
  assert image_changes == (fusion_name != 'text_only')


def test_modality_dropout_acts_only_in_training():
  model = _model('concat', modality_dropout=0.5)
  image, tokens, mask = _inputs()
  variables = model.init(jax.random.key(0), image, tokens, mask)
  apply = lambda train, seed: model.apply(variables, image, tokens, mask, train=train,
                                          rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(apply(False, 1), apply(False, 2))
  assert np.abs(apply(True, 1) - apply(True, 2)).max() > 1e-5
  # Without it nothing else in this model is random in training.
  plain = _model('concat')
  np.testing.assert_array_equal(
      *(plain.apply(variables, image, tokens, mask, train=True,
                    rngs={'dropout': jax.random.key(s)}) for s in (1, 2)))
  keep = lambda m, train: m._keep(20_000, train)  # pylint: disable=protected-access
  image_B, text_B = model.apply(variables, True, method=keep, rngs={'dropout': jax.random.key(3)})
  assert not ((image_B == 0) & (text_B == 0)).any()  # Never both.
  assert abs((image_B == 0).mean() - 0.5) < 0.02 and abs((text_B == 0).mean() - 0.5) < 0.02
  assert (np.asarray(model.apply(variables, False, method=keep)) == 1).all()


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): x.shape for p, x in flat}


@pytest.mark.parametrize('name', cnn.NAMES)
def test_image_tower_has_the_standalone_cnns_paths_minus_its_head(name):
  x = jnp.zeros((1, 32, 32, 3))
  alone = jax.eval_shape(lambda: cnn.make(name, 10).init(jax.random.key(0), x, train=False))
  model = _model('image_only', image_model=name)
  tokens = jnp.zeros((1, 8), jnp.int32)
  fused = jax.eval_shape(lambda: model.init(jax.random.key(0), x, tokens, tokens > 0))
  assert set(fused) == set(alone)  # 'params', and 'batch_stats' where the CNN has BatchNorm.
  for collection in alone:
    tower = {k.removeprefix('image_tower/'): v for k, v in _paths(fused[collection]).items()
             if k.startswith('image_tower/')}
    standalone = _paths(alone[collection])
    assert tower and all(standalone.get(k) == v for k, v in tower.items())
    head = set(standalone) - set(tower)
    if collection == 'params':  # The head: one Dense module with the 10 class outputs.
      assert len({k.split('/')[0] for k in head}) == 1, head
      assert all(standalone[k][-1] == 10 for k in head), head
    else:
      assert not head


def test_text_tower_has_the_lms_and_classifiers_trunk_paths():
  tokens = jnp.zeros((1, 8), jnp.int32)
  c = _config('.').model
  cfg = model_lib.TransformerConfig.from_config(c, 13)
  lm = model_lib.Transformer(dataclasses.replace(cfg, causal=True))
  classifier = model_lib.Classifier(cfg, num_classes=3)
  init = lambda m, *args: _paths(jax.eval_shape(
      lambda: m.init(jax.random.key(0), *args))['params'])
  fused = init(_model('text_only'), jnp.zeros((1, 16, 16, 3)), tokens, tokens == 0)
  tower = {k.removeprefix('text_tower/'): v for k, v in fused.items()
           if k.startswith('text_tower/')}
  assert tower == init(lm, tokens)
  trunk = {k: v for k, v in init(classifier, tokens).items() if not k.startswith('cls_head')}
  assert tower == trunk
  assert {'embedding', 'pos_embedding', 'norm_final/scale'} <= set(tower)
  assert any(k.startswith('block_0/') for k in tower)


def test_bad_model_settings_are_config_errors():
  _error(lambda: _model('sum'), 'model.fusion', 'concat')
  _error(lambda: _model('image_only', modality_dropout=0.2), 'needs two modalities')
  _error(lambda: _model('gated', modality_dropout=0.7), '[0, 0.5]')
  _error(lambda: _model('concat', image_model='vgg'), '--config.model.image_model')


# --- the task, the trainer and the command line --------------------------------------------


def test_a_few_steps_on_an_eight_device_mesh_reduce_the_loss(tmp_path):
  _dataset(tmp_path / 'data')
  c = _config(tmp_path / 'data', augment=True, image_size=32)
  c.model.update(fusion='attention', image_model='simple_cnn', modality_dropout=0.2)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  trainer = train.Trainer(c, str(tmp_path / 'run'))
  assert len(trainer.mesh.devices.ravel()) == 8
  result = trainer.run()
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  loss = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert loss[-1] < 0.5 * loss[0], loss
  assert result['eval/accuracy'] > 0.5 and 'eval/macro_f1' in result
  for name in ('labels.json', 'tokenizer.json', 'image_stats.json', 'classes_eval.md'):
    assert (tmp_path / 'run' / name).exists(), name


@pytest.mark.parametrize('alpha', ['white', 'channel'])
def test_a_plan_without_data_has_the_real_shapes_and_parameters(tmp_path, alpha):
  c = _config(_dataset(tmp_path / 'data'), alpha=alpha, vocab_size=20)
  planned = train.Trainer(c, str(tmp_path / 'w'), shapes_only=True)
  loaded = train.Trainer(c, str(tmp_path / 'w'))
  assert isinstance(planned.task.data, shapes.Shapes)
  chex.assert_trees_all_equal_shapes_and_dtypes(planned.task.example_batch(),
                                                loaded.task.example_batch())
  # The word vocab is an upper bound ('at most'), so only the embedding may be larger.
  planned_params = {k: v for k, v in planned.abstract_state.params.items() if k != 'text_tower'}
  loaded_params = {k: v for k, v in loaded.abstract_state.params.items() if k != 'text_tower'}
  chex.assert_trees_all_equal_shapes_and_dtypes(planned_params, loaded_params)


def test_built_to_evaluate_it_reads_only_the_evaluated_split(tmp_path):
  c = _config(_dataset(tmp_path / 'data'))
  trained = train.Trainer(c, str(tmp_path / 'w')).task
  trained.write_files(str(tmp_path / 'w'))
  os.remove(os.path.join(c.data.data_dir, 'train.jsonl'))  # Reading it now would fail.
  c.data.test_split = 'missing'
  task = train.Trainer(c, str(tmp_path / 'w'), training=False).task
  assert set(task.data.splits) == {'test'}
  assert task.has_split('test') and not task.has_split('missing')
  assert task.data.class_names == trained.data.class_names


def test_pretrained_towers_load_by_prefix_and_a_frozen_one_stays(tmp_path, capsys):
  """A CIFAR CNN seeds image_tower/, a byte LM text_tower/ (init.workdir's prefix=dir form)."""
  tiny = lambda name: config_lib.load(os.path.join(ROOT, 'tests', name))
  cnn_run, lm_run = str(tmp_path / 'cnn'), str(tmp_path / 'lm')
  c = tiny('tiny_cnn_config.py')
  c.train.update(steps=2, checkpoint_every=2)
  train.Trainer(c, cnn_run).run()
  cnn_params = jax.device_get(train.Trainer(c, cnn_run, read_only=True).initial_state().params)
  c = tiny('tiny_config.py')
  c.data.tokenizer = 'byte'
  c.model.update(num_layers=1, num_heads=2, d_model=16, seq_len=8)
  c.train.update(steps=2, eval_every=0, checkpoint_every=2)
  train.Trainer(c, lm_run).run()
  lm_params = jax.device_get(train.Trainer(c, lm_run, read_only=True).initial_state().params)

  mm = _config(_dataset(tmp_path / 'data'), tokenizer='byte', image_size=32)
  mm.model.update(image_model='simple_cnn', num_layers=1, num_heads=2, d_model=16, seq_len=8)
  mm.init.update(workdir=f'image_tower={cnn_run},text_tower={lm_run}', skip='^params/Dense_1/')
  mm.optim.freeze = '^image_tower/'
  mm.train.steps = 3
  trainer = train.Trainer(mm, str(tmp_path / 'mm'))
  trainer.run()
  report = capsys.readouterr().out
  assert f'init: loaded 8 arrays from {cnn_run}@2' in report  # 3 convs and Dense_0, no head.
  assert 'skipped (init.skip)' in report and 'Dense_1' in report
  after = jax.device_get(train.Trainer(mm, str(tmp_path / 'mm'), read_only=True)
                         .initial_state().params)
  head_less = {k: v for k, v in cnn_params.items() if k != 'Dense_1'}
  jax.tree.map(np.testing.assert_array_equal, after['image_tower'], head_less)  # Frozen.
  # Fine-tuned from the LM's: moved, but started there (the byte ids, then [PAD] and [CLS]).
  emb_lm, emb_mm = lm_params['embedding'], after['text_tower']['embedding']
  assert emb_mm.shape == (emb_lm.shape[0] + 2, emb_lm.shape[1])
  assert 0 < np.abs(emb_mm[:emb_lm.shape[0]] - emb_lm).max() < 0.015  # 3 Adam steps of 3e-3.


def _lm_main(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'lm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


# The experiment file shrunk to seconds: the user's command with these overrides.
_TINY = ('--config.model.d_model=16', '--config.model.num_layers=1',
         '--config.model.num_heads=2', '--config.model.fusion_dim=16', '--config.data.max_len=8',
         '--config.model.seq_len=8', '--config.train.batch_size=8', '--config.train.epochs=2',
         '--config.data.val_fraction=0.25', '--config.model.num_classes=3')


def test_cli_trains_then_evaluates_a_split_of_another_dir(tmp_path):
  data = _dataset(tmp_path / 'data')
  other = _dataset(tmp_path / 'other', splits=('test',))  # No train split there.
  os.rename(os.path.join(other, 'test.jsonl'), os.path.join(other, 'new.jsonl'))
  workdir = str(tmp_path / 'mm')
  common = ('--config=experiments/emoji_fusion.py', f'--workdir={workdir}')
  train_run = _lm_main(*common, f'--config.data.data_dir={data}', *_TINY)
  assert train_run.returncode == 0, train_run.stderr[-2000:]
  metrics = os.path.join(workdir, 'metrics.jsonl')
  before = open(metrics).read().count('\n')
  # The contract's command exactly: the run's saved config, with only the dir and split changed.
  result = _lm_main('--mode=eval', *common, f'--config.data.data_dir={other}',
                    '--config.data.eval_split=new')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = open(metrics).read().splitlines()
  assert len(lines) == before + 1
  last = json.loads(lines[-1])
  assert {'eval/accuracy', 'eval/macro_f1'} <= set(last) and last['eval/data_dir'] == other


@pytest.mark.parametrize('break_it, needle', [
    (lambda d: os.remove(os.path.join(d, 'images', 'a', 'tr2.png')),
     "train.jsonl' line 5: image"),
    (lambda d: _write(d, 'train', _rows(8) + [{'image': 'images/a/tr0.png', 'label': 'red'}]),
     "train.jsonl' line 9 has no 'text'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, break_it, needle):
  data = _dataset(tmp_path / 'data')
  break_it(data)
  result = _lm_main('--config=experiments/emoji_fusion.py', f'--workdir={tmp_path / "mm"}',
                    f'--config.data.data_dir={data}', *_TINY)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], lines
