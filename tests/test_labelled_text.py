"""Labelled text: files and TFDS parse exactly, batches are pure, bad input is fixable."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import batches
from lm import config as config_lib
from lm import labelled_text
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError

SHARED_TEXT = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'text')


def _shared(name: str) -> str:
  path = os.path.join(SHARED_TEXT, name)
  if not os.path.isdir(path):
    pytest.skip(f'no shared text data at {path}')
  return path


def _config(data_dir, **data):
  c = config_lib.get_config()
  c.data.name = ''
  c.data.data_dir = str(data_dir)
  c.data.tokenizer = 'word'
  c.data.eval_split = 'test'
  c.model.seq_len = 8
  c.train.batch_size = 4
  for key, value in data.items():
    c.data[key] = value
  return c


def _jsonl(path, rows):
  path.write_text(''.join(json.dumps({'text': t, 'label': l}) + '\n' for t, l in rows))


def _toy_dir(tmp_path, n_train=24, n_test=11, rare_every=0):
  """train.jsonl and test.jsonl of short texts labelled by their first word."""
  words = ['good', 'bad', 'fine']
  for split, n in (('train', n_train), ('test', n_test)):
    rows = []
    for i in range(n):
      label = 'rare' if rare_every and i % rare_every == 0 else words[i % 3]
      rows.append((f'{label} text number {i} ' + 'x ' * (i % 7), label))
    _jsonl(tmp_path / f'{split}.jsonl', rows)
  return tmp_path


def _error(make, *needles) -> str:
  """The message of the ConfigError `make` raises, checked to be one line holding `needles`."""
  with pytest.raises(ConfigError) as info:
    make()
  message = str(info.value)
  assert '\n' not in message, message
  for needle in needles:
    assert needle in message, message
  return message


# ---------------------------------------------------------------------------------------------
# Reading.


@pytest.mark.parametrize('name,split,rows,counts', [
    ('sms_spam', 'train', 4081, {'ham': 3536, 'spam': 545}),
    ('sms_spam', 'test', 670, {'ham': 589, 'spam': 81}),
    ('ag_news', 'train', 10001, {'Business': 2496, 'Sci/Tech': 2538, 'Sports': 2458,
                                 'World': 2509}),
    ('ag_news', 'test', 7600, {'Business': 1900, 'Sci/Tech': 1900, 'Sports': 1900,
                               'World': 1900}),
    ('sst2', 'train', 67349, {'0': 29780, '1': 37569}),
    ('sst2', 'validation', 872, None),
])
def test_shared_files_parse_to_their_documented_counts(name, split, rows, counts):
  text_key = 'sentence' if name == 'sst2' else 'text'
  cfg = _config(_shared(name), text_key=text_key).data
  examples = labelled_text.read_split(cfg, split)
  assert len(examples.texts) == len(examples.labels) == rows
  if counts:
    assert {k: examples.labels.count(k) for k in counts} == counts
    assert labelled_text.label_vocab(examples) == tuple(sorted(counts))
  assert all(isinstance(t, str) and t for t in examples.texts[:100])


def test_csv_fields_hold_commas_quotes_newlines_and_non_ascii(tmp_path):
  (tmp_path / 'train.csv').write_text(
      'id,text,label\n'
      '1,"Hello, world",ham\n'
      '2,"He said ""hi""\nthen left",spam\n'
      '\n'
      '3,Café ☕ naïve,ham\n', encoding='utf-8')
  ex = labelled_text.read_split(_config(tmp_path).data, 'train')
  assert ex.texts == ['Hello, world', 'He said "hi"\nthen left', 'Café ☕ naïve']
  assert ex.labels == ['ham', 'spam', 'ham']
  assert ex.lines == [2, 3, 6]  # Where each record starts, counting the embedded newline.


def test_csv_strips_a_byte_order_mark_from_the_header(tmp_path):
  (tmp_path / 'train.csv').write_text('\ufefftext,label\nhi,a\n', encoding='utf-8')
  assert labelled_text.read_split(_config(tmp_path).data, 'train').texts == ['hi']


def test_tsv_reads_quotes_literally(tmp_path):
  (tmp_path / 'train.tsv').write_text(
      'sentence\tlabel\n'
      '"quoted" start\t1\n'
      'a "middle\t0\n'
      "it 's fine , really\t1\n")
  ex = labelled_text.read_split(_config(tmp_path, text_key='sentence').data, 'train')
  assert ex.texts == ['"quoted" start', 'a "middle', "it 's fine , really"]
  assert ex.labels == ['1', '0', '1']


def test_jsonl_labels_may_be_ints_and_sort_numerically(tmp_path):
  _jsonl(tmp_path / 'train.jsonl', [('a', 10), ('b', 2), ('c', ' 2 '), ('d', 0)])
  ex = labelled_text.read_split(_config(tmp_path).data, 'train')
  assert ex.labels == ['10', '2', '2', '0']
  assert labelled_text.label_vocab(ex) == ('0', '2', '10')


class LabelledTextTestReviews(tfds.core.GeneratorBasedBuilder):
  """A two-split TFDS dataset with ClassLabel names out of alphabetical order."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'sentence': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=['pos', 'neg']),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(12, 1), 'test': self._generate_examples(5, -1)}

  def _generate_examples(self, n, sign):
    for i in range(n):
      yield i, {'sentence': f'review {i} is {"good" if i % 2 else "bad"}',
                'label': i % 2 if sign > 0 else -1}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  LabelledTextTestReviews(data_dir=str(path), file_format='array_record').download_and_prepare()
  return str(path)


def test_tfds_uses_class_label_names_in_their_order(tfds_dir):
  c = _config(tfds_dir, name='labelled_text_test_reviews', text_key='sentence', eval_split='')
  data = labelled_text.make(c)
  assert data.class_names == ('pos', 'neg')
  assert data.num_train == 12 and data.class_counts.tolist() == [6, 6]
  ex = labelled_text.read_split(c.data, 'train')
  for text, label in zip(ex.texts, ex.labels):
    assert label == ('neg' if text.endswith('good') else 'pos')


def test_tfds_errors_name_the_feature_and_the_unlabelled_split(tfds_dir):
  c = _config(tfds_dir, name='labelled_text_test_reviews', eval_split='')
  _error(lambda: labelled_text.make(c), "no feature 'text'", 'sentence, label',
         '--config.data.text_key')
  c.data.text_key = 'sentence'
  c.data.eval_split = 'test'
  _error(lambda: labelled_text.make(c), "split 'test' example 0", 'label -1',
         '--config.data.eval_split')
  c.data.eval_split = 'validation'
  _error(lambda: labelled_text.make(c), "no split 'validation'", 'val_fraction')


# ---------------------------------------------------------------------------------------------
# Labels.


def test_labels_save_and_load_atomically(tmp_path):
  labelled_text.save_labels(str(tmp_path), ('spam', 'ham', 'Café'))
  assert labelled_text.load_labels(str(tmp_path)) == ('spam', 'ham', 'Café')
  assert os.listdir(tmp_path) == ['labels.json']  # No temp file left behind.
  _error(lambda: labelled_text.load_labels(str(tmp_path / 'none')), 'no labels.json')


def test_saved_labels_fix_the_class_ids_on_resume(tmp_path):
  c = _config(_toy_dir(tmp_path))
  first = labelled_text.make(c)
  assert first.class_names == ('bad', 'fine', 'good')
  labelled_text.save_labels(str(tmp_path / 'work'), ('good', 'bad', 'fine'))
  again = labelled_text.make(c, labels=labelled_text.load_labels(str(tmp_path / 'work')))
  old = np.array(first.class_names)[first.train_batch(3)['label']]
  new = np.array(again.class_names)[again.train_batch(3)['label']]
  np.testing.assert_array_equal(old, new)


def test_label_seen_only_at_eval_names_file_and_line(tmp_path):
  _toy_dir(tmp_path)
  _jsonl(tmp_path / 'test.jsonl', [('good one', 'good'), ('what', 'meh')])
  _error(lambda: labelled_text.make(_config(tmp_path)), 'test.jsonl', 'line 2', "'meh'",
         'training labels', 'retrain')
  names = ('good', 'bad')
  _error(lambda: labelled_text.make(_config(tmp_path), labels=names), 'train.jsonl',
         'line 3', "'fine'", 'labels.json', 'fresh workdir')


# ---------------------------------------------------------------------------------------------
# Tokens.


def test_tokenize_pads_truncates_and_places_cls():
  tok = tokenizer_lib.ByteTokenizer()  # pad 256, [CLS] 257.
  tokens, lengths = labelled_text.tokenize(['ab', 'abcdefgh', ''], tok, 5)
  np.testing.assert_array_equal(tokens, [[97, 98, 256, 256, 256],
                                         [97, 98, 99, 100, 101],
                                         [256] * 5])
  np.testing.assert_array_equal(lengths, [2, 5, 0])
  tokens, lengths = labelled_text.tokenize(['ab', 'abcdefgh', ''], tok, 5, cls=True)
  np.testing.assert_array_equal(tokens, [[257, 97, 98, 256, 256],
                                         [257, 97, 98, 99, 100],
                                         [257, 256, 256, 256, 256]])
  np.testing.assert_array_equal(lengths, [3, 5, 1])


def test_batches_mark_real_tokens_and_use_the_tokenizers_specials(tmp_path):
  c = _config(_toy_dir(tmp_path), max_len=6)
  data = labelled_text.make(c, cls=True)
  assert (data.pad_id, data.cls_id) == (0, 2)
  assert data.vocab_size == data.tokenizer.vocab_size
  batch = data.train_batch(0)
  assert batch['tokens'].shape == batch['token_mask'].shape == (4, 6)
  assert batch['tokens'].dtype == np.int32 and batch['token_mask'].dtype == bool
  assert batch['label'].dtype == np.int32 and batch['valid'].dtype == np.float32
  assert (batch['tokens'][:, 0] == data.cls_id).all() and batch['valid'].tolist() == [1] * 4
  np.testing.assert_array_equal(batch['token_mask'], batch['tokens'] != data.pad_id)
  for tokens, label in zip(batch['tokens'], batch['label']):
    # The first word of every toy text is its label.
    assert data.tokenizer.decode(tokens[1:2]) == data.class_names[label]

  c.data.tokenizer = 'byte'
  byte = labelled_text.make(c)
  assert (byte.pad_id, byte.cls_id, byte.vocab_size) == (256, 257, 258)
  assert (byte.train_batch(0)['tokens'] != byte.cls_id).all()  # [CLS] only if asked.


# ---------------------------------------------------------------------------------------------
# Batches.


def test_batches_are_a_pure_function_of_the_step(tmp_path):
  c = _config(_toy_dir(tmp_path))
  a, b = labelled_text.make(c), labelled_text.make(c)
  for step in (0, 5, 17):  # 17 is in the third epoch (6 steps each).
    for key, value in a.train_batch(step).items():
      np.testing.assert_array_equal(value, b.train_batch(step)[key])
  assert a.steps_per_epoch == 6
  assert not np.array_equal(a.train_batch(0)['tokens'], a.train_batch(1)['tokens'])
  c.seed = 1
  assert not np.array_equal(a.train_batch(0)['tokens'],
                            labelled_text.make(c).train_batch(0)['tokens'])


def test_two_processes_rows_concatenate_to_the_one_process_batch(tmp_path):
  c = _config(_toy_dir(tmp_path), eval_batch_size=6)
  whole = labelled_text.make(c)
  parts = [labelled_text.make(c, process_index=i, process_count=2) for i in range(2)]
  for step in (0, 7):
    for key, value in whole.train_batch(step).items():
      np.testing.assert_array_equal(
          value, np.concatenate([p.train_batch(step)[key] for p in parts]))
  for b_whole, b0, b1 in zip(whole.eval_batches('test'), *(p.eval_batches('test') for p in parts)):
    for key, value in b_whole.items():
      np.testing.assert_array_equal(value, np.concatenate([b0[key], b1[key]]))


def test_oversampling_makes_a_13_percent_class_about_half_the_draws(tmp_path):
  rows = [(f'spam offer {i}', 'spam') if i % 8 == 0 else (f'hi there {i}', 'ham')
          for i in range(100)]  # 13 spam, as in sms_spam.
  _jsonl(tmp_path / 'train.jsonl', rows)
  c = _config(tmp_path, eval_split='')
  c.train.batch_size = 20
  plain = labelled_text.make(c)
  assert plain.class_counts.tolist() == [87, 13]
  drawn = np.concatenate([plain.train_batch(s)['label'] for s in range(100)])  # 20 epochs.
  assert np.mean(drawn == 1) == 0.13
  c.data.oversample = True
  over = labelled_text.make(c)
  drawn = np.concatenate([over.train_batch(s)['label'] for s in range(100)])
  # 2000 draws of p = 1/2: the standard error is 0.011, so +-0.04 fails only if it is wrong.
  assert abs(np.mean(drawn == 1) - 0.5) < 0.04


def test_eval_covers_every_example_once_and_pads_with_invalid_rows(tmp_path):
  c = _config(_toy_dir(tmp_path, n_test=11), eval_batch_size=4)
  data = labelled_text.make(c)
  eval_batches = data.eval_batches('test')
  assert len(eval_batches) == 3
  valid = np.concatenate([b['valid'] for b in eval_batches])
  assert valid.tolist() == [1.0] * 11 + [0.0]
  tokens = np.concatenate([b['tokens'] for b in eval_batches])[:11]
  split = data.splits['test']
  np.testing.assert_array_equal(tokens, split.tokens_NxL)
  labels = np.concatenate([b['label'] for b in eval_batches])[:11]
  np.testing.assert_array_equal(labels, split.labels_N)
  assert data.eval_batches('train')[0]['tokens'].shape == (4, 8)  # Any split by name.


def test_val_fraction_holds_out_a_fixed_part_of_train(tmp_path):
  c = _config(_toy_dir(tmp_path, n_train=40), val_fraction=0.25, eval_split='validation')
  data = labelled_text.make(c)
  assert data.num_train == 30 and len(data.splits['validation'].labels_N) == 10
  c.seed = 3
  again = labelled_text.make(c)
  np.testing.assert_array_equal(data.splits['validation'].tokens_NxL,
                                again.splits['validation'].tokens_NxL)
  train_rows, val_rows = batches.hold_out(40, 0.25)
  assert sorted(np.concatenate([train_rows, val_rows])) == list(range(40))


def test_tokenizer_is_built_from_train_texts_only(tmp_path):
  _toy_dir(tmp_path)
  _jsonl(tmp_path / 'test.jsonl', [('zebra good', 'good')])
  data = labelled_text.make(_config(tmp_path))
  assert 'zebra' not in data.tokenizer.words
  assert data.splits['test'].tokens_NxL[0, 0] == tokenizer_lib.WordTokenizer.UNK


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the line and the fix.


def test_missing_split_file_lists_what_the_dir_has(tmp_path):
  _toy_dir(tmp_path)
  _error(lambda: labelled_text.make(_config(tmp_path, eval_split='validation')),
         'no validation.csv', 'test.jsonl, train.jsonl', '--config.data.eval_split',
         'val_fraction')


@pytest.mark.parametrize('key,fix', [('text_key', '--config.data.text_key'),
                                     ('label_key', '--config.data.label_key')])
def test_missing_column_lists_the_header(tmp_path, key, fix):
  (tmp_path / 'train.csv').write_text('body,category\nhi,a\n')
  _error(lambda: labelled_text.make(_config(tmp_path, **{'text_key': 'body', key: 'nope'})),
         'train.csv', 'line 1', "'nope'", 'body, category', fix)


@pytest.mark.parametrize('name,content,needles', [
    ('train.csv', '', ['is empty', 'header']),
    ('train.csv', 'text,label\n', ['no rows']),
    ('train.jsonl', '\n', ['is empty']),
    ('train.csv', 'text,label\na,b\nc, d,e\n', ['line 3', '3 fields', 'quote fields']),
    ('train.csv', 'text,label\na,b\n"open,b\nmore\n', ['line 3', 'quote']),
    ('train.csv', 'text,label\na,b\n"x"y,b\n', ['line 3', 'quote']),
    ('train.tsv', 'text\tlabel\na\tb\nc\td\te\n', ['line 3', '3 fields', 'tabs']),
    ('train.csv', 'text,label\na,\n', ['line 2', 'label', 'non-empty']),
    ('train.jsonl', '{"text": "a", "label": 1}\n{"text": "b", "label": 2\n',
     ['line 2', 'not JSON', 'one JSON object per line']),
    ('train.jsonl', '{"text": "a", "label": 1}\n["b", 2]\n', ['line 2', 'not an object']),
    ('train.jsonl', '{"text": "a", "label": 1}\n{"txt": "b", "label": 2}\n',
     ['line 2', "no 'text'", 'txt, label', '--config.data.text_key']),
    ('train.jsonl', '{"text": "a", "label": 1.5}\n', ['line 1', 'label 1.5']),
    ('train.jsonl', '{"text": 3, "label": 1}\n', ['line 1', 'not a string']),
])
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, name, content, needles):
  (tmp_path / name).write_text(content)
  _error(lambda: labelled_text.make(_config(tmp_path, eval_split='')), name, *needles)


def test_not_utf8_names_the_file_and_the_fix(tmp_path):
  (tmp_path / 'train.csv').write_bytes(b'text,label\ncaf\xe9,a\n')
  _error(lambda: labelled_text.make(_config(tmp_path, eval_split='')), 'train.csv', 'UTF-8')


def test_two_files_for_one_split_is_an_error(tmp_path):
  _toy_dir(tmp_path)
  (tmp_path / 'train.csv').write_text('text,label\na,b\n')
  _error(lambda: labelled_text.make(_config(tmp_path)), 'train.csv, train.jsonl',
         'keep only one')


def test_texts_all_empty_after_tokenizing(tmp_path):
  _jsonl(tmp_path / 'train.jsonl', [('   ', 'a'), ('\n', 'b')] * 4)
  _error(lambda: labelled_text.make(_config(tmp_path, eval_split='')), 'train.jsonl',
         'empty after tokenizing', 'text_key')


def test_val_fraction_with_a_validation_split_is_ambiguous(tmp_path):
  _toy_dir(tmp_path)
  _jsonl(tmp_path / 'validation.jsonl', [('good', 'good')])
  _error(lambda: labelled_text.make(_config(tmp_path, val_fraction=0.1)),
         "own 'validation' split", 'val_fraction=0')


def test_batch_larger_than_train_is_an_error(tmp_path):
  c = _config(_toy_dir(tmp_path, n_train=3))
  _error(lambda: labelled_text.make(c), 'train.batch_size=4', '3 training examples')
