"""Data stand-ins for --dry_run: the batches real data would give, without reading examples."""

import os

import chex
import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import data
from lm import images
from lm import labelled_text
from lm import shapes
from lm import train
from lm.config import ConfigError

SHARED_TFDS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'tfds')


def _example(batch: dict) -> dict:
  return jax.tree.map(lambda x: x[:1], batch)


def _lm_config(tmp_path, **data_fields):
  (tmp_path / 'input.txt').write_text('hello world, said the byte-level model\n' * 40)
  c = config_lib.get_config()
  c.data.update(name=f'files:{tmp_path}/input.txt', **data_fields)
  c.model.update(num_layers=1, num_heads=2, d_model=16, seq_len=16)
  c.train.batch_size = 8
  return c


def test_text_stand_in_batches_look_like_the_real_ones(tmp_path):
  c = _lm_config(tmp_path, tokenizer='byte')
  real, stand_in = data.make_text_data(c), shapes.text(c)
  chex.assert_trees_all_equal_shapes_and_dtypes(_example(stand_in.train_batch(0)),
                                                _example(real.train_batch(0)))
  assert (stand_in.vocab_size, stand_in.tokens_per_batch) == (real.vocab_size,
                                                              real.tokens_per_batch)


def test_a_plan_without_data_counts_the_same_parameters(tmp_path):
  c = _lm_config(tmp_path, tokenizer='byte')
  planned = train.Trainer(c, str(tmp_path / 'w'), shapes_only=True)
  loaded = train.Trainer(c, str(tmp_path / 'w'))
  assert isinstance(planned.task.data, shapes.Shapes)
  assert planned.param_count == loaded.param_count and planned.steps == loaded.steps
  chex.assert_trees_all_equal_shapes_and_dtypes(planned.abstract_state, loaded.abstract_state)


@pytest.mark.parametrize('fields,vocab,why', [
    ({'tokenizer': 'byte'}, 256, 'byte tokenizer'),
    ({'tokenizer': 'char'}, shapes.ASSUMED_CHAR_VOCAB, 'ASSUMED'),
    ({'tokenizer': 'word', 'vocab_size': 500}, 503, 'at most data.vocab_size=500'),
])
def test_lm_vocab_comes_from_the_config_and_says_so(tmp_path, fields, vocab, why):
  c = _lm_config(tmp_path, **fields)
  stand_in = shapes.text(c)
  assert stand_in.vocab_size == vocab and why in stand_in.describe()[0]
  c.model.vocab_size = 1000  # The model's own size wins over any tokenizer's.
  assert shapes.text(c).vocab_size == 1000


def test_sentencepiece_vocab_is_read_from_its_model_file(tmp_path):
  c = _lm_config(tmp_path, tokenizer='sentencepiece', tokenizer_path=str(tmp_path / 'no.model'))
  with pytest.raises(ConfigError, match='no.model'):
    shapes.text(c)


def _labelled_config(tmp_path):
  (tmp_path / 'train.csv').write_text('text,label\n' + 'a fine day,pos\nso bad,neg\n' * 10)
  (tmp_path / 'test.csv').write_text('text,label\ngood,pos\nbad,neg\n')
  c = config_lib.get_config()
  c.task = 'classify_text'
  c.data.update(name='', data_dir=str(tmp_path), tokenizer='word', vocab_size=50,
                eval_split='test', max_len=12, positive_label='pos')
  c.model.update(num_classes=2, seq_len=16, pool='cls')
  c.train.update(batch_size=4, epochs=2)
  return c


def test_labelled_text_stand_in_batches_look_like_the_real_ones(tmp_path):
  c = _labelled_config(tmp_path)
  real = labelled_text.make(c, cls=True)
  stand_in = shapes.labelled_text(c)
  chex.assert_trees_all_equal_shapes_and_dtypes(_example(stand_in.train_batch(0)),
                                                _example(real.train_batch(0)))
  assert stand_in.max_len == real.max_len and stand_in.num_classes == real.num_classes
  assert stand_in.vocab_size >= real.vocab_size  # An upper bound: 'at most'.
  assert stand_in.steps_per_epoch is None  # Split files state no count ...
  assert 'pass --plan_data' in stand_in.describe()[-1]  # ... and the plan says so.
  assert 'pos' in stand_in.class_names  # So data.positive_label is a class of the plan.


def test_npz_images_plan_from_the_array_header(tmp_path):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / 'train.npz', image=rng.integers(0, 256, (40, 8, 6), np.uint8),
           label=rng.integers(0, 3, 40))
  c = config_lib.get_config()
  c.task = 'classify'
  c.data.update(name='', data_dir=str(tmp_path), val_fraction=0.25, eval_split='validation')
  c.model.num_classes = 3
  c.train.batch_size = 4
  real, stand_in = images.make_image_data(c), shapes.images(c)
  chex.assert_trees_all_equal_shapes_and_dtypes(_example(stand_in.train_batch(0)),
                                                _example(real.train_batch(0)))
  assert stand_in.steps_per_epoch == real.steps_per_epoch == 7  # 30 of 40 in batches of 4.


def test_known_image_datasets_plan_without_their_files():
  c = config_lib.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='/nonexistent', val_fraction=0.1)
  c.train.batch_size = 32
  stand_in = shapes.images(c)
  assert stand_in.train_batch(0)['image'].shape == (32, 32, 32, 3)
  assert stand_in.steps_per_epoch == 45_000 // 32
  c.data.name = 'imagenette'
  with pytest.raises(ConfigError, match='--plan_data'):
    shapes.images(c)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_TFDS, 'cifar10')),
                    reason=f'no prepared cifar10 in {SHARED_TFDS} (../shared/tfds)')
def test_tfds_images_plan_from_dataset_info():
  c = config_lib.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir=SHARED_TFDS, val_fraction=0.1, max_examples=64)
  c.train.batch_size = 8
  real, stand_in = images.make_image_data(c), shapes.images(c)
  chex.assert_trees_all_equal_shapes_and_dtypes(_example(stand_in.train_batch(0)),
                                                _example(real.train_batch(0)))
  assert stand_in.class_names == real.class_names
  assert stand_in.steps_per_epoch == real.steps_per_epoch
  assert 'TFDS metadata' in stand_in.describe()[0]
