"""Text loading, pure-function batches, process slicing, and fixable errors."""

import os

import numpy as np
import pytest

from lm import config as config_lib
from lm import data
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError

TFDS_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'tfds')
needs_tfds = pytest.mark.skipif(not os.path.isdir(TFDS_DIR),
                                reason=f'no prepared TFDS data dir at {TFDS_DIR}')


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


@pytest.fixture
def corpus_dir(tmp_path):
  """Three files; sorted order is a, b, c, so c is the heldout file."""
  rng = np.random.default_rng(0)
  for name in 'abc':
    _write(str(tmp_path / f'{name}.txt'), ''.join(rng.choice(list('xyz \n'), size=3000)))
  return tmp_path


def _config(name, **data_overrides):
  config = config_lib.get_config()
  config.data.name = name
  for k, v in data_overrides.items():
    config.data[k] = v
  config.model.seq_len = 16
  config.train.batch_size = 8
  return config


def _arange_data(num_tokens=1000, seq_len=16, batch_size=8, seed=0, **kw):
  """TextData over tokens 0..N-1, so every window shows where it starts."""
  split = data.Split(tokens=np.arange(num_tokens, dtype=np.int32), bytes_per_token=1.0,
                     chars_per_token=1.0)
  return data.TextData(tokenizer_lib.ByteTokenizer(), {'train': split, 'eval': split},
                       batch_size=batch_size, seq_len=seq_len, seed=seed, **kw)


def test_batches_are_pure_functions_of_seed_and_step(corpus_dir):
  config = _config(f'files:{corpus_dir}/*.txt')
  d1, d2 = data.make_text_data(config), data.make_text_data(config)
  b = d1.train_batch(5)
  assert b['tokens'].shape == b['targets'].shape == (8, 16)
  assert b['tokens'].dtype == b['targets'].dtype == np.int32
  np.testing.assert_array_equal(b['tokens'], d2.train_batch(5)['tokens'])
  assert not np.array_equal(b['tokens'], d1.train_batch(6)['tokens'])
  config.seed = 1
  assert not np.array_equal(b['tokens'], data.make_text_data(config).train_batch(5)['tokens'])


def test_windows_are_contiguous_and_targets_shifted():
  d = _arange_data()
  b = d.train_batch(0)
  np.testing.assert_array_equal(b['targets'], b['tokens'] + 1)
  np.testing.assert_array_equal(b['tokens'], b['tokens'][:, :1] + np.arange(16))


def test_window_starts_cover_nanogpt_range():
  # Starts are uniform over [0, N - L - 1]: the last target is the last token, never past it.
  d = _arange_data(num_tokens=19, seq_len=16)
  starts = {int(s) for step in range(30) for s in d.train_batch(step)['tokens'][:, 0]}
  assert starts == {0, 1, 2}


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_partition_the_global_batch(process_count):
  whole = _arange_data().train_batch(3)
  slices = [_arange_data(process_index=i, process_count=process_count).train_batch(3)
            for i in range(process_count)]
  for key in ('tokens', 'targets'):
    assert all(s[key].shape == (8 // process_count, 16) for s in slices)
    # Process i holds rows [i * B_local, (i + 1) * B_local) of the global batch.
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), whole[key])


def test_eval_batches_are_fixed_and_independent_of_training_seed():
  d0, d1 = _arange_data(seed=0), _arange_data(seed=1)
  e0, e1 = d0.eval_batches(3), d1.eval_batches(3)
  assert len(e0) == 3
  for a, b in zip(e0, e1):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  assert not np.array_equal(e0[0]['tokens'], e0[1]['tokens'])
  assert not np.array_equal(e0[0]['tokens'], d0.train_batch(0)['tokens'])
  np.testing.assert_array_equal(d0.eval_batches(1)[0]['tokens'], e0[0]['tokens'])
  half = _arange_data(process_index=1, process_count=2).eval_batches(1)[0]
  np.testing.assert_array_equal(half['tokens'], e0[0]['tokens'][4:])


def test_files_split_heldout_and_recursive_glob(tmp_path):
  for name, text in [('a.txt', 'aaa'), ('sub/b.txt', 'bbb'), ('sub/deeper/c.txt', 'ccc')]:
    _write(str(tmp_path / name), text)
  train, heldout = data.load_text(_config(f'files:{tmp_path}/**/*.txt').data)
  assert (train, heldout) == ('aaa\nbbb', 'ccc')
  train, heldout = data.load_text(_config(f'files:{tmp_path}/**/*.txt', heldout_files=2).data)
  assert (train, heldout) == ('aaa', 'bbb\nccc')


def test_one_file_validates_on_its_last_tenth(tmp_path):
  """An input.txt alone: nanoGPT's cut, the last 10% of the bytes, whatever heldout_files says."""
  text = ''.join(np.random.default_rng(0).choice(list('abc \n'), size=1000))
  _write(str(tmp_path / 'input.txt'), text)
  for heldout_files in (1, 0):
    cfg = _config(f'files:{tmp_path}/input.txt', heldout_files=heldout_files).data
    assert data.load_text(cfg) == (text[:900], text[900:])
  cfg.val_fraction = 0.25
  assert data.load_text(cfg) == (text[:750], text[750:])


def test_the_cut_moves_back_to_a_character_boundary(tmp_path):
  # '€' is 3 bytes at 898..900: byte 900 is inside it, so validation starts at the '€'.
  text = 'a' * 898 + '€' + 'b' * 99
  _write(str(tmp_path / 'input.txt'), text)
  train, val = data.load_text(_config(f'files:{tmp_path}/input.txt').data)
  assert (train, val) == ('a' * 898, '€' + 'b' * 99)


def test_val_fraction_cuts_several_files_instead_of_holding_one_out(tmp_path):
  _write(str(tmp_path / 'a.txt'), 'a' * 50)
  _write(str(tmp_path / 'b.txt'), 'b' * 49)  # Joined with a newline: 100 bytes.
  cfg = _config(f'files:{tmp_path}/*.txt', val_fraction=0.1).data
  assert data.load_text(cfg) == ('a' * 50 + '\n' + 'b' * 39, 'b' * 10)
  cfg.max_bytes = 60  # The cap applies before the cut: 50 + 10 bytes read, 61 with the newline.
  assert data.load_text(cfg) == ('a' * 50 + '\n' + 'b' * 3, 'b' * 7)
  cfg = _config(f'files:{tmp_path}/*.txt', val_fraction=0.5, tokenizer='byte')
  assert data.make_text_data(cfg).files['validation'] == (
      'the last 50% of their bytes (data.val_fraction=0.5)')


def test_error_val_fraction_out_of_range(tmp_path):
  _write(str(tmp_path / 'input.txt'), 'x' * 100)
  for bad in (1.0, -0.1):
    _assert_config_error(_config(f'files:{tmp_path}/input.txt', val_fraction=bad),
                         f'data.val_fraction={bad}', '[0, 1)')


def test_max_bytes_caps_each_split_without_splitting_characters(tmp_path):
  _write(str(tmp_path / 'a.txt'), 'ab€cd')  # '€' is 3 bytes, at bytes 2..4.
  _write(str(tmp_path / 'b.txt'), 'xyz')
  _write(str(tmp_path / 'c.txt'), 'heldout')
  cfg = _config(f'files:{tmp_path}/*.txt', heldout_files=1, max_bytes=4).data
  assert data.load_text(cfg) == ('ab', 'held')
  cfg.max_bytes = 10  # 7 bytes of a.txt and 3 of b.txt.
  assert data.load_text(cfg) == ('ab€cd\nxyz', 'heldout')
  cfg.max_bytes = 9
  assert data.load_split(cfg, 'train') == 'ab€cd\nxy'


def test_token_storage_and_text_ratios(corpus_dir):
  d = data.make_text_data(_config(f'files:{corpus_dir}/*.txt', tokenizer='byte'))
  assert d.vocab_size == 256 and d.tokens_per_batch == 8 * 16
  assert d.train_tokens.dtype == np.uint16  # Half the memory of int32 for small vocabs.
  assert len(d.train_tokens) == 6001 and len(d.eval_tokens) == 3000
  assert d.bytes_per_token() == d.chars_per_token() == 1.0


def test_make_text_data_uses_a_given_tokenizer(corpus_dir):
  given = tokenizer_lib.CharTokenizer.from_text('xyz \n!')
  d = data.make_text_data(_config(f'files:{corpus_dir}/*.txt'), tokenizer=given)
  assert d.tokenizer is given and d.vocab_size == 6


def test_save_and_load_tokenizer(tmp_path):
  tok = tokenizer_lib.CharTokenizer.from_text('hello world\n')
  workdir = str(tmp_path / 'run')
  data.save_tokenizer(workdir, tok)
  assert os.listdir(workdir) == ['tokenizer.json']  # No temp file left behind.
  again = data.load_tokenizer(workdir)
  assert again.chars == tok.chars
  data.save_tokenizer(workdir, tokenizer_lib.ByteTokenizer())  # Overwrites in place.
  assert data.load_tokenizer(workdir).vocab_size == 256


def test_load_tokenizer_without_a_file_says_train_first(tmp_path):
  with pytest.raises(ConfigError, match='train there first'):
    data.load_tokenizer(str(tmp_path))


@needs_tfds
def test_tiny_shakespeare():
  config = _config('tiny_shakespeare', data_dir=TFDS_DIR, test_split='test')
  train, heldout = data.load_text(config.data)
  assert (len(train), len(heldout)) == (1_003_854, 55_770)
  d = data.make_text_data(config)
  assert d.vocab_size == 65
  assert (len(d.train_tokens), len(d.eval_tokens)) == (1_003_854, 55_770)
  assert d.bytes_per_token('test') == 1.0
  assert d.eval_batches(1, split='test')[0]['tokens'].shape == (8, 16)


def _assert_config_error(config, *fragments):
  with pytest.raises(ConfigError) as err:
    data.make_text_data(config)
  message = str(err.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message


def test_error_missing_data_dir(tmp_path):
  _assert_config_error(_config('tiny_shakespeare', data_dir=str(tmp_path / 'nope')),
                       'does not exist', '--config.data.data_dir')


def test_error_dataset_not_in_data_dir(tmp_path):
  _assert_config_error(_config('tiny_shakespeare', data_dir=str(tmp_path)),
                       'not prepared', '--config.data.data_dir')


@needs_tfds
def test_error_unknown_dataset_lists_the_prepared_ones():
  _assert_config_error(_config('imdb_reviews', data_dir=TFDS_DIR),
                       'imdb_reviews', 'cifar10, tiny_shakespeare', '--config.data.data_dir')


@needs_tfds
def test_error_unknown_split_lists_the_splits():
  _assert_config_error(_config('tiny_shakespeare', data_dir=TFDS_DIR, eval_split='valid'),
                       "'valid'", 'train, validation, test', '--config.data.eval_split')


@needs_tfds
def test_error_missing_text_feature():
  _assert_config_error(_config('cifar10', data_dir=TFDS_DIR, eval_split='test'),
                       'id, image, label', '--config.data.text_key')


def test_error_empty_glob(tmp_path):
  _assert_config_error(_config(f'files:{tmp_path}/*.txt'), 'matched no files', 'glob')


def test_error_too_few_files(corpus_dir):
  _assert_config_error(_config(f'files:{corpus_dir}/*.txt', heldout_files=3),
                       'matched 3 file(s)', '--config.data.heldout_files')


def test_error_no_heldout_files(corpus_dir):
  _assert_config_error(_config(f'files:{corpus_dir}/*.txt', heldout_files=0),
                       '--config.data.heldout_files', '--config.data.val_fraction=0.1')


def test_error_test_split_with_files(corpus_dir):
  _assert_config_error(_config(f'files:{corpus_dir}/*.txt', test_split='test'),
                       "--config.data.test_split=''")


def test_error_corpus_shorter_than_one_sequence(tmp_path):
  _write(str(tmp_path / 'a.txt'), 'x' * 100)
  _write(str(tmp_path / 'b.txt'), 'short')
  _assert_config_error(_config(f'files:{tmp_path}/*.txt'),
                       'shorter than one sequence', 'eval split', '--config.model.seq_len')


def test_error_batch_not_divisible_by_processes(corpus_dir):
  with pytest.raises(ConfigError, match='--config.train.batch_size'):
    data.make_text_data(_config(f'files:{corpus_dir}/*.txt'), process_count=3)


def _binary(path, size=3000):
  """Bytes of an image or an archive: NULs, control bytes, invalid UTF-8."""
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())


def test_binary_file_with_char_tokenizer_is_a_one_line_error(corpus_dir):
  """Before, it became a 472-symbol vocabulary of control bytes and U+FFFD without a word."""
  _binary(str(corpus_dir / 'a2.txt'))  # Sorted before c.txt: a training file.
  _assert_config_error(_config(f'files:{corpus_dir}/*.txt'), 'matched 1 binary file(s)',
                       f'{corpus_dir}/a2.txt (binary:', 'NUL bytes', 'data.tokenizer=char',
                       'Narrow the glob')


def test_binary_heldout_file_is_refused_too(corpus_dir):
  _binary(str(corpus_dir / 'd.txt'))  # Sorted last: the heldout file.
  _assert_config_error(_config(f'files:{corpus_dir}/*.txt'), f'{corpus_dir}/d.txt (binary:')


def test_binary_file_with_byte_tokenizer_warns_naming_it(corpus_dir, capsys):
  _binary(str(corpus_dir / 'a2.txt'))
  data.make_text_data(_config(f'files:{corpus_dir}/*.txt', tokenizer='byte'))
  warnings = capsys.readouterr().err.strip().splitlines()
  assert len(warnings) == 1 and warnings[0].startswith('warning: '), warnings
  assert f'{corpus_dir}/a2.txt (binary:' in warnings[0] and 'byte tokenizer' in warnings[0]


def test_non_utf8_text_warns_naming_the_file_and_the_bytes(corpus_dir, capsys):
  (corpus_dir / 'a2.txt').write_bytes('café crème brûlée\n'.encode('latin-1') * 50)
  d = data.make_text_data(_config(f'files:{corpus_dir}/*.txt'))
  err = capsys.readouterr().err
  assert err.count('warning: ') == 1, err
  assert f'{corpus_dir}/a2.txt (200 bytes not UTF-8, read as U+FFFD)' in err
  assert '\ufffd' in d.tokenizer.chars  # Still loaded: a warning, not an error.


def test_utf8_text_is_quiet_even_cut_mid_character(tmp_path, capsys):
  # A U+FFFD the file spells out and a form feed are text; max_bytes=101 cuts an 'é' in half.
  _write(str(tmp_path / 'a.txt'), 'é' * 100 + ' replacement \ufffd\f' + 'x' * 200)
  _write(str(tmp_path / 'b.txt'), 'é' * 100 + 'y' * 200)
  data.make_text_data(_config(f'files:{tmp_path}/*.txt', tokenizer='byte', max_bytes=101))
  data.make_text_data(_config(f'files:{tmp_path}/*.txt'))
  assert capsys.readouterr().err == ''
