"""Tokenizers: characters, UTF-8 bytes, words, or a trained SentencePiece model.

All four share one duck-typed interface: `vocab_size`, `encode(text) -> int32 [N]`,
`decode(ids) -> str` and `to_json()`; `from_json` reverses the last, so a workdir's
`tokenizer.json` is enough to sample without the dataset. A classifier also needs a padding
and a [CLS] id: `specials(tokenizer)` says which ids those are and how big the model's vocab is.

Train a SentencePiece model offline (the train split only, so validation stays unseen):

  python -m lm.tokenizer train --data=tiny_shakespeare --data_dir=../shared/tfds \
      --vocab_size=512 --output=/tmp/sp.model
"""

import argparse
import base64
import collections
import dataclasses
import io
import os
import re
import sys

from absl import logging
import numpy as np
import sentencepiece as spm

from lm.config import ConfigError


def _in_vocab(ids, vocab_size: int) -> np.ndarray:
  # Models often round vocab_size up for speed; ids in that padding decode to nothing.
  ids = np.asarray(ids, np.int64).reshape(-1)
  return ids[(ids >= 0) & (ids < vocab_size)]


def unknown_chars(tokenizer, text: str) -> str:
  """The distinct characters of `text` the tokenizer has no token for, sorted ('' if none).

  The char tokenizer drops them, SentencePiece without byte fallback turns them into <unk>;
  bytes represent everything. A prompt with any of them is not what the model is shown.
  """
  if isinstance(tokenizer, CharTokenizer):
    missing = set(text) - set(tokenizer.chars)
  elif isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer._sp  # pylint: disable=protected-access
    unk = sp.unk_id()
    missing = {c for c in set(text) if unk >= 0 and unk in sp.encode(c)}
  else:
    missing = set()
  return ''.join(sorted(missing))


class CharTokenizer:
  """One token per character of the training text, as nanoGPT does for Shakespeare.

  Characters the training text lacks are dropped at encode time (with a warning that counts
  them): validation text rarely has any, and dropping keeps every id a real character.
  """

  def __init__(self, chars: str):
    self.chars = chars
    # Sorted code points make encode a vectorised searchsorted instead of a dict lookup per char.
    self._codes = np.array([ord(c) for c in chars], np.uint32)
    if np.any(np.diff(self._codes.astype(np.int64)) <= 0):
      raise ValueError('CharTokenizer chars must be sorted and distinct')

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    return cls(''.join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    ids = np.searchsorted(self._codes, codes)
    known = (ids < len(self._codes)) & (self._codes[np.minimum(ids, len(self._codes) - 1)] == codes)
    if not known.all():
      unseen = sorted(set(chr(c) for c in codes[~known]))
      logging.warning('CharTokenizer dropped %d characters not in its vocab: %r',
                      int((~known).sum()), ''.join(unseen[:20]))
      ids = ids[known]
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return self._codes[_in_vocab(ids, self.vocab_size)].astype('<u4').tobytes().decode('utf-32-le')

  def to_json(self) -> dict:
    return {'kind': 'char', 'vocab_size': self.vocab_size, 'chars': self.chars}


class ByteTokenizer:
  """UTF-8 bytes: 256 tokens, no training, nothing unknown."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    # A sampled byte sequence need not be valid UTF-8.
    return _in_vocab(ids, 256).astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def to_json(self) -> dict:
    return {'kind': 'byte', 'vocab_size': 256}


class SentencePieceTokenizer:
  """A trained SentencePiece model, held as its serialized proto."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def from_file(cls, path: str) -> 'SentencePieceTokenizer':
    with open(path, 'rb') as f:
      return cls(f.read())

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(_in_vocab(ids, self.vocab_size).tolist())

  def to_json(self) -> dict:
    # The proto itself, not a path, so the workdir stays usable if the model file moves.
    return {'kind': 'sentencepiece', 'vocab_size': self.vocab_size,
            'model_proto_base64': base64.b64encode(self.model_proto).decode('ascii')}


class WordTokenizer:
  """Lower-cased words and single punctuation marks, the most frequent of the train text.

  Ids 0, 1 and 2 are [PAD], [UNK] and [CLS]; words follow by falling train count, ties by
  word, so the same text always builds the same vocab. A word is a run of Unicode letters,
  digits or underscores; "don't" is three tokens (don ' t), which needs no language rules.
  """

  PAD, UNK, CLS = 0, 1, 2
  SPECIALS = ('[PAD]', '[UNK]', '[CLS]')
  _TOKEN = re.compile(r'\w+|[^\w\s]')

  def __init__(self, words):
    self.words = tuple(words)
    if len(set(self.words)) != len(self.words):
      raise ValueError('WordTokenizer words must be distinct')
    self._ids = {w: i for i, w in enumerate(self.words, start=len(self.SPECIALS))}

  @classmethod
  def from_text(cls, text: str, max_words: int) -> 'WordTokenizer':
    counts = collections.Counter(cls._TOKEN.findall(text.lower()))
    ranked = sorted(counts.items(), key=lambda word_count: (-word_count[1], word_count[0]))
    return cls(word for word, _ in ranked[:max_words])

  @property
  def vocab_size(self) -> int:
    return len(self.SPECIALS) + len(self.words)

  def encode(self, text: str) -> np.ndarray:
    ids = self._ids
    return np.fromiter([ids.get(w, self.UNK) for w in self._TOKEN.findall(text.lower())], np.int32)

  def decode(self, ids) -> str:
    names = self.SPECIALS + self.words
    return ' '.join(names[i] for i in _in_vocab(ids, self.vocab_size) if i != self.PAD)

  def to_json(self) -> dict:
    return {'kind': 'word', 'vocab_size': self.vocab_size, 'words': list(self.words)}


@dataclasses.dataclass(frozen=True)
class Specials:
  """The padding and [CLS] ids of a tokenizer, and the vocab a model must embed for it."""
  pad_id: int
  cls_id: int
  vocab_size: int  # Tokenizer ids plus any appended specials.


def specials(tokenizer) -> Specials:
  """The word tokenizer reserves its own; byte, char and SentencePiece get two appended.

  Every id of those three is text (even SentencePiece here: it is trained with no pad, BOS or
  EOS), so padding is `vocab_size` and [CLS] `vocab_size + 1`: ids >= tokenizer.vocab_size
  are exactly the specials, and `decode` already drops them.
  """
  if isinstance(tokenizer, WordTokenizer):
    return Specials(WordTokenizer.PAD, WordTokenizer.CLS, tokenizer.vocab_size)
  v = tokenizer.vocab_size
  return Specials(pad_id=v, cls_id=v + 1, vocab_size=v + 2)


def from_json(d: dict):
  """Rebuilds a tokenizer from its `to_json()` dict."""
  kind = d.get('kind')
  if kind == 'char':
    return CharTokenizer(d['chars'])
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'word':
    return WordTokenizer(d['words'])
  if kind == 'sentencepiece':
    return SentencePieceTokenizer(base64.b64decode(d['model_proto_base64']))
  raise ValueError(f'unknown tokenizer kind {kind!r} in tokenizer json')


def build(data_cfg, train_text: str):
  """Picks the tokenizer `data_cfg.tokenizer` names; char and word build from `train_text`."""
  name = data_cfg.tokenizer
  if name == 'char':
    return CharTokenizer.from_text(train_text)
  if name == 'byte':
    return ByteTokenizer()
  if name == 'word':
    if data_cfg.vocab_size <= 0:
      raise ConfigError(f'data.vocab_size={data_cfg.vocab_size}: the word tokenizer needs at '
                        'least one word; set --config.data.vocab_size (e.g. 20000)')
    return WordTokenizer.from_text(train_text, data_cfg.vocab_size)
  if name == 'sentencepiece':
    if data_cfg.tokenizer_path:
      return _load_sentencepiece(data_cfg.tokenizer_path)
    # No model given: train one on this run's train text (saved in the workdir like any other).
    if data_cfg.vocab_size < 256:
      raise ConfigError(f'data.vocab_size={data_cfg.vocab_size} is too small for a '
                        'SentencePiece vocabulary; set --config.data.vocab_size (e.g. 8000)')
    return SentencePieceTokenizer(train_sentencepiece(train_text, data_cfg.vocab_size))
  raise ConfigError(f'unknown tokenizer {name!r}; set --config.data.tokenizer to char, byte, '
                    'word or sentencepiece')


def _load_sentencepiece(path: str) -> SentencePieceTokenizer:
  if not path:
    raise ConfigError('tokenizer=sentencepiece needs a model: train one with `python -m '
                      'lm.tokenizer train ...` and pass --config.data.tokenizer_path=<file>')
  if not os.path.isfile(path):
    raise ConfigError(f'SentencePiece model {path!r} does not exist; fix '
                      '--config.data.tokenizer_path or train one with `python -m lm.tokenizer train`')
  try:
    return SentencePieceTokenizer.from_file(path)
  except RuntimeError as e:
    raise ConfigError(f'{path!r} is not a SentencePiece model ({e}); retrain it with '
                      '`python -m lm.tokenizer train`') from e


def train_sentencepiece(text: str, vocab_size: int, model_type: str = 'unigram',
                        byte_fallback: bool = False) -> bytes:
  """Trains a SentencePiece model on `text`; returns the serialized model proto."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines()),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=byte_fallback,
      # Identity normalisation, kept spaces and a newline piece make decode(encode(x)) == x,
      # which an LM that must write line breaks and indentation needs.
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      user_defined_symbols=['\n'],
      character_coverage=1.0,
      # The LM needs no sentence markers: the corpus is one stream.
      bos_id=-1,
      eos_id=-1,
      # A small corpus may not support the requested size; take what it supports.
      hard_vocab_limit=False,
      input_sentence_size=2_000_000,
      shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1,
      minloglevel=2)
  return model.getvalue()


def main(argv=None) -> str:
  """`python -m lm.tokenizer train ...`: writes a SentencePiece model, returns its path."""
  parser = argparse.ArgumentParser(prog='python -m lm.tokenizer')
  sub = parser.add_subparsers(dest='command', required=True)
  train = sub.add_parser('train', help='train a SentencePiece model on a dataset\'s train split')
  train.add_argument('--data', required=True, help="TFDS name or 'files:<glob>'")
  train.add_argument('--data_dir', default='', help='TFDS data dir')
  train.add_argument('--text_key', default='text', help='TFDS feature holding the text')
  train.add_argument('--split', default='train', help='TFDS split to train on')
  train.add_argument('--heldout_files', type=int, default=1,
                     help='files: the last N files are validation and not trained on')
  train.add_argument('--val_fraction', type=float, default=0.0,
                     help='files: the last fraction of the bytes is validation and not trained '
                     'on (0: 0.1 for a single file, else --heldout_files)')
  train.add_argument('--max_bytes', type=int, default=0, help='files: read at most this much')
  train.add_argument('--vocab_size', type=int, required=True)
  train.add_argument('--model_type', default='unigram', choices=['unigram', 'bpe'])
  train.add_argument('--byte_fallback', action='store_true',
                     help='encode unseen characters as bytes (needs vocab_size > 256)')
  train.add_argument('--output', required=True, help='where to write the .model file')
  args = parser.parse_args(argv)

  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import data  # pylint: disable=g-import-not-at-top  # lm.data imports this module.
  data_cfg = config_lib.get_config().data
  data_cfg.name = args.data
  data_cfg.data_dir = args.data_dir
  data_cfg.text_key = args.text_key
  data_cfg.train_split = args.split
  data_cfg.heldout_files = args.heldout_files
  data_cfg.val_fraction = args.val_fraction
  data_cfg.max_bytes = args.max_bytes
  text = data.load_split(data_cfg, 'train')
  proto = train_sentencepiece(text, args.vocab_size, args.model_type, args.byte_fallback)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'wb') as f:
    f.write(proto)
  tok = SentencePieceTokenizer(proto)
  print(f'wrote {args.output}: vocab {tok.vocab_size}, '
        f'{len(text) / max(len(tok.encode(text)), 1):.2f} characters per token on the train text')
  print(f'use it with --config.data.tokenizer=sentencepiece '
        f'--config.data.tokenizer_path={os.path.abspath(args.output)}')
  return args.output


def _cli_spelling(message: str) -> str:
  # Data errors name the trainer's flags; this CLI spells them differently.
  for trainer_flag, cli_flag in (('--config.data.name', '--data'),
                                 ('--config.data.train_split', '--split'),
                                 ('--config.data.', '--')):
    message = message.replace(trainer_flag, cli_flag)
  return message


if __name__ == '__main__':
  try:
    main()
  except ConfigError as e:
    print(f'error: {_cli_spelling(str(e))}', file=sys.stderr)
    sys.exit(2)
