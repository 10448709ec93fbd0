"""Tokenizers round-trip text, survive to_json/from_json, and fail with fixable messages."""

import json
import os

import numpy as np
import pytest

from lm import config as config_lib
from lm import data
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError

TFDS_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'tfds')
# Newlines, runs of spaces and leading/trailing blanks: the cases normalisation would eat.
TRICKY = '  First Citizen:\n\nBefore we  proceed any further, hear me speak.\n\t end \n'


def _corpus(num_words=4000, seed=0) -> str:
  rng = np.random.default_rng(seed)
  words = ['the', 'king', 'queen', 'speak', 'hear', 'me', 'First', 'Citizen:', 'we', 'proceed',
           'any', 'further,', 'speak.', 'Before', 'shall', 'stand', 'for', 'seed', 'end', '\tthou']
  lines = [' '.join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(num_words // 6)]
  return '\n'.join(lines) + '\n  \n'


def _data_cfg(**overrides):
  cfg = config_lib.get_config().data
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope='module')
def sp_proto():
  return tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=80)


def _json_round_trip(tok):
  return tokenizer_lib.from_json(json.loads(json.dumps(tok.to_json())))


def test_char_round_trip_and_vocab_is_sorted_train_chars():
  tok = tokenizer_lib.CharTokenizer.from_text(TRICKY)
  assert tok.chars == ''.join(sorted(set(TRICKY)))
  ids = tok.encode(TRICKY)
  assert ids.dtype == np.int32 and len(ids) == len(TRICKY)
  assert tok.decode(ids) == TRICKY
  assert tok.decode(ids.tolist()) == TRICKY
  assert _json_round_trip(tok).decode(ids) == TRICKY


def test_char_drops_unseen_characters():
  tok = tokenizer_lib.CharTokenizer.from_text('abc')
  np.testing.assert_array_equal(tok.encode('a€xb'), [0, 1])
  assert tok.decode(tok.encode('a€xb')) == 'ab'


def test_unknown_chars_are_what_a_tokenizer_cannot_represent(sp_proto):
  char = tokenizer_lib.CharTokenizer.from_text('abc \n')
  assert tokenizer_lib.unknown_chars(char, 'a€x b€\n') == 'x€'
  assert tokenizer_lib.unknown_chars(char, 'cab\n') == ''
  assert tokenizer_lib.unknown_chars(tokenizer_lib.ByteTokenizer(), '€\x00😀') == ''
  sp = tokenizer_lib.SentencePieceTokenizer(sp_proto)
  assert tokenizer_lib.unknown_chars(sp, 'the king\n') == ''
  assert tokenizer_lib.unknown_chars(sp, 'the Zing€') == 'Z€'  # Never in its corpus.
  with_fallback = tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=300, byte_fallback=True))
  assert tokenizer_lib.unknown_chars(with_fallback, 'the Zing€') == ''


def test_char_handles_non_bmp_characters():
  text = 'a😀b\n'
  tok = tokenizer_lib.CharTokenizer.from_text(text)
  assert tok.vocab_size == 4 and tok.decode(tok.encode(text)) == text


def test_decode_drops_padding_ids():
  # A model whose vocab is rounded up can sample ids the tokenizer never made.
  tok = tokenizer_lib.CharTokenizer.from_text('ab')
  assert tok.decode([0, 7, 1, -1]) == 'ab'
  assert tokenizer_lib.ByteTokenizer().decode([104, 300, 105]) == 'hi'


def test_byte_round_trip():
  tok = tokenizer_lib.ByteTokenizer()
  text = TRICKY + 'é€😀'
  ids = tok.encode(text)
  assert tok.vocab_size == 256 and ids.dtype == np.int32
  assert len(ids) == len(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert _json_round_trip(tok).decode(ids) == text
  assert tok.decode([0xE2, 0x82]) == '\ufffd'  # A cut character is replaced, not an error.


def test_sentencepiece_round_trip(sp_proto):
  tok = tokenizer_lib.SentencePieceTokenizer(sp_proto)
  assert 40 <= tok.vocab_size <= 80
  ids = tok.encode(TRICKY)
  assert ids.dtype == np.int32
  assert len(ids) < len(TRICKY)  # Pieces longer than one character were learned.
  assert tok.decode(ids) == TRICKY


def test_sentencepiece_json_round_trip(sp_proto):
  tok = tokenizer_lib.SentencePieceTokenizer(sp_proto)
  again = _json_round_trip(tok)
  assert again.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(again.encode(TRICKY), tok.encode(TRICKY))


def test_build_picks_by_name(tmp_path, sp_proto):
  assert tokenizer_lib.build(_data_cfg(tokenizer='char'), 'hello').vocab_size == 4
  assert isinstance(tokenizer_lib.build(_data_cfg(tokenizer='byte'), 'hello'),
                    tokenizer_lib.ByteTokenizer)
  path = tmp_path / 'sp.model'
  path.write_bytes(sp_proto)
  tok = tokenizer_lib.build(_data_cfg(tokenizer='sentencepiece', tokenizer_path=str(path)), '')
  assert tok.decode(tok.encode(TRICKY)) == TRICKY


@pytest.mark.parametrize('overrides,fix', [
    (dict(tokenizer='bpe'), '--config.data.tokenizer'),
    (dict(tokenizer='sentencepiece', vocab_size=100), '--config.data.vocab_size'),
    (dict(tokenizer='sentencepiece', tokenizer_path='/nonexistent/sp.model'),
     '--config.data.tokenizer_path'),
])
def test_build_errors_name_the_fix(overrides, fix):
  with pytest.raises(ConfigError, match=fix):
    tokenizer_lib.build(_data_cfg(**overrides), 'text')


def test_build_rejects_a_file_that_is_not_a_model(tmp_path):
  path = tmp_path / 'sp.model'
  path.write_text('not a model')
  with pytest.raises(ConfigError, match='lm.tokenizer train'):
    tokenizer_lib.build(_data_cfg(tokenizer='sentencepiece', tokenizer_path=str(path)), '')


def test_cli_trains_on_files_glob(tmp_path, capsys):
  for i in range(3):
    (tmp_path / f'part{i}.txt').write_text(_corpus(1500, seed=i))
  out = tmp_path / 'models' / 'sp.model'
  path = tokenizer_lib.main(['train', f'--data=files:{tmp_path}/*.txt', '--vocab_size=70',
                             f'--output={out}'])
  assert path == str(out)
  printed = capsys.readouterr().out
  assert str(out) in printed and f'--config.data.tokenizer_path={out}' in printed
  tok = tokenizer_lib.build(_data_cfg(tokenizer='sentencepiece', tokenizer_path=str(out)), '')
  assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_cli_error_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='matched no files'):
    tokenizer_lib.main(['train', f'--data=files:{tmp_path}/*.txt', '--vocab_size=70',
                        f'--output={tmp_path}/sp.model'])


def test_char_vocab_of_tiny_shakespeare_is_65():
  if not os.path.isdir(TFDS_DIR):
    pytest.skip(f'no prepared TFDS data dir at {TFDS_DIR}')
  text = data.load_split(_data_cfg(data_dir=TFDS_DIR), 'train')
  tok = tokenizer_lib.CharTokenizer.from_text(text)
  assert tok.vocab_size == 65
  assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_word_vocab_is_most_frequent_words_ties_by_word():
  text = 'B b a. c c, C! a b'
  tok = tokenizer_lib.WordTokenizer.from_text(text, max_words=3)
  # b and c: 3 each (lower-cased), then a: 2; the marks '.', ',', '!' (1 each) are cut.
  assert tok.words == ('b', 'c', 'a')
  assert tok.vocab_size == 6
  assert tokenizer_lib.WordTokenizer.from_text('c c, C! a b B b a.', 3).words == tok.words
  full = tokenizer_lib.WordTokenizer.from_text(text, max_words=100)
  assert full.words == ('b', 'c', 'a', '!', ',', '.')


def test_word_encode_specials_and_round_trip():
  tok = tokenizer_lib.WordTokenizer.from_text("The café isn't open; the end.", 100)
  W = tokenizer_lib.WordTokenizer
  assert (W.PAD, W.UNK, W.CLS) == (0, 1, 2)
  ids = tok.encode('THE Café, zebra!')
  assert ids.dtype == np.int32
  assert ids[0] == tok.encode('the')[0] >= 3
  assert tok.decode(ids) == 'the café [UNK] [UNK] [UNK]'  # ',' and '!' are unseen words too.
  assert tok.decode([W.CLS, *tok.encode("isn't"), W.PAD, W.PAD]) == "[CLS] isn ' t"
  again = _json_round_trip(tok)
  assert again.words == tok.words
  np.testing.assert_array_equal(again.encode('the end'), tok.encode('the end'))


def test_build_word_uses_data_vocab_size():
  tok = tokenizer_lib.build(_data_cfg(tokenizer='word', vocab_size=2), 'a a b b c')
  assert tok.words == ('a', 'b') and tok.vocab_size == 5
  with pytest.raises(ConfigError, match='--config.data.vocab_size'):
    tokenizer_lib.build(_data_cfg(tokenizer='word', vocab_size=0), 'a')


def test_specials_are_reserved_for_words_and_appended_otherwise():
  word = tokenizer_lib.WordTokenizer(['a', 'b'])
  assert tokenizer_lib.specials(word) == tokenizer_lib.Specials(pad_id=0, cls_id=2, vocab_size=5)
  assert tokenizer_lib.specials(tokenizer_lib.ByteTokenizer()) == tokenizer_lib.Specials(
      pad_id=256, cls_id=257, vocab_size=258)
  char = tokenizer_lib.CharTokenizer.from_text('abc')
  assert tokenizer_lib.specials(char).pad_id == 3 and tokenizer_lib.specials(char).cls_id == 4
  assert char.decode([0, 3, 4, 1]) == 'ab'  # Specials decode to nothing.


def test_sentencepiece_without_a_model_trains_one_on_the_train_text():
  text = '\n'.join(f'the {w} sat on the mat near the {w} door' for w in
                    ('cat', 'dog', 'bird', 'fish', 'cow', 'hen') * 40)
  tok = tokenizer_lib.build(_data_cfg(tokenizer='sentencepiece', vocab_size=300), text)
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer) and tok.vocab_size <= 300
  assert tok.decode(tok.encode('the cat sat')) == 'the cat sat'
