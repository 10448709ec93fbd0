"""Text data for language modelling: load a corpus, tokenize it, cut random windows.

Letter key: G = global batch, B = this process's rows, L = seq_len, N = tokens in a split.

A batch is a pure function of (seed, step, process index), so resuming at step s replays
exactly the batches an uninterrupted run would have seen, with no iterator state to save.
The global batch does not depend on the process count: each process draws every row's start
(G integers, cheap) and keeps its own slice.
"""

import codecs
import dataclasses
import glob
import json
import os
import sys

import numpy as np

from lm import batches
from lm import datasets
from lm import labelled_text
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.config import ConfigError

_FILES = 'files:'
# Eval windows come from this stream whatever the training seed, so runs with different seeds
# (or configs) are scored on the same windows and their losses compare without sampling noise.
_EVAL_STREAM = 0x5EED_E7A1
_SPLIT_IDS = {'train': 0, 'eval': 1, 'test': 2}
_ONE_FILE_VAL_FRACTION = 0.1  # A files: corpus of one file (an input.txt): nanoGPT's 90/10.


def load_text(data_cfg) -> tuple[str, str]:
  """Returns (train_text, eval_text) for `data_cfg.name`, a TFDS name or 'files:<glob>'."""
  if data_cfg.name.startswith(_FILES):
    return tuple(_load_files(data_cfg, ('train', 'eval')))
  return load_split(data_cfg, 'train'), load_split(data_cfg, 'eval')


def load_split(data_cfg, which: str) -> str:
  """Returns the text of split `which`: 'train', 'eval' or 'test' (the config's splits)."""
  if data_cfg.name.startswith(_FILES):
    return _load_files(data_cfg, (which,))[0]
  return _load_tfds(data_cfg, f'{which}_split')


# ---------------------------------------------------------------------------------------------
# TFDS.


def _load_tfds(data_cfg, field: str) -> str:
  """Joins the text of every example of the split `data_cfg.<field>` names."""
  builder = datasets.tfds_builder(data_cfg.name, data_cfg.data_dir,
                                  features={data_cfg.text_key: 'text_key'})
  source = datasets.tfds_source(builder, data_cfg[field], field)
  texts = (source[i][data_cfg.text_key] for i in range(len(source)))
  # Newlines between examples so documents do not run into each other.
  return '\n'.join(t.decode('utf-8', errors='replace') if isinstance(t, bytes) else t
                   for t in texts)


# ---------------------------------------------------------------------------------------------
# files:<glob>.


def _split_files(data_cfg) -> tuple[list[str], list[str], float]:
  """(train files, held-out files, val_fraction): how a files: corpus splits.

  A val_fraction > 0 makes the last fraction of the bytes of all the files the validation
  split (nanoGPT's 90/10 cut), and no file is held out; 0 means 0.1 when the glob matches one
  file, else the last `heldout_files` of the sorted matches are the validation split.
  """
  pattern = os.path.expanduser(data_cfg.name[len(_FILES):])
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f'{data_cfg.name!r} matched no files; fix the glob (quote it so the shell '
                      "leaves it alone, '**' recurses)")
  fraction = data_cfg.val_fraction
  if not 0 <= fraction < 1:
    raise ConfigError(f'data.val_fraction={fraction} must be in [0, 1); 0.1 holds out the last '
                      '10% of the bytes')
  if fraction == 0 and len(paths) == 1:
    fraction = _ONE_FILE_VAL_FRACTION
  if fraction:
    return paths, [], fraction
  instead = '; or --config.data.val_fraction=0.1 validates on the last 10% of the bytes instead'
  heldout = data_cfg.heldout_files
  if heldout < 1:
    raise ConfigError(f'heldout_files={heldout}: files: needs validation text; set '
                      f'--config.data.heldout_files=1 or more{instead}')
  if len(paths) < heldout + 1:
    raise ConfigError(f'{data_cfg.name!r} matched {len(paths)} file(s) but heldout_files='
                      f'{heldout} needs {heldout + 1} (at least one to train on); add files or '
                      f'lower --config.data.heldout_files{instead}')
  return paths[:-heldout], paths[-heldout:], 0.0


def _cut(text: str, fraction: float) -> tuple[str, str]:
  """(first part, last `fraction` of the UTF-8 bytes), cut before a character, never in one."""
  raw = text.encode('utf-8')
  cut = int(len(raw) * (1 - fraction))  # As nanoGPT: train = data[:int(n * 0.9)].
  while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # A UTF-8 continuation byte.
    cut -= 1
  return raw[:cut].decode('utf-8'), raw[cut:].decode('utf-8')


def _read_files(paths: list[str], max_bytes: int, data_cfg=None
                ) -> tuple[str, dict[str, str]]:
  """(text, {path: why it does not look like UTF-8 text}) of the files read in order.

  A .csv, .tsv or .jsonl file contributes its text column (data.text_key: the texts of a
  labelled dataset, one per line), any other file its raw text. Reading stops after
  `max_bytes` bytes (0 = no limit).
  """
  # An incremental decoder drops a character cut in half at the cap instead of inventing one.
  decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
  texts, problems = [], {}
  left = max_bytes or -1
  for path in paths:
    if data_cfg is not None and path.endswith(labelled_text.TABLES):
      raw = '\n'.join(labelled_text.read_texts(path, data_cfg)).encode('utf-8')
      raw = raw[:left] if left >= 0 else raw
    else:
      with open(path, 'rb') as f:
        raw = f.read(left)
    text = decoder.decode(raw, final=max_bytes == 0 or len(raw) < left)
    decoder.reset()
    problem = _not_text(raw, text)
    if problem:
      problems[path] = problem
    texts.append(text)
    if max_bytes:
      left -= len(raw)
      if left <= 0:
        break
  return '\n'.join(texts), problems


_BINARY = 'binary'
# ASCII control bytes other than whitespace; in UTF-8 they never occur inside a character.
_CONTROL_BYTES = bytes(c for c in range(32) if chr(c) not in '\t\n\r\f\v') + b'\x7f'


def _not_text(raw: bytes, text: str) -> str:
  """'' for UTF-8 text; else what is wrong, starting with 'binary' for a non-text file."""
  nul = raw.count(b'\0')
  # U+FFFD the decoder made, not the ones the file spells out (EF BF BD).
  undecodable = text.count('\ufffd') - raw.count(b'\xef\xbf\xbd')
  controls = len(raw) - len(raw.translate(None, _CONTROL_BYTES))
  if nul or (undecodable + controls) > 0.3 * max(len(text), 1):
    return (f'{_BINARY}: {nul} NUL bytes, {undecodable} bytes not UTF-8 and {controls} control '
            f'characters in {len(raw)} bytes')
  if undecodable:
    return f'{undecodable} bytes not UTF-8, read as U+FFFD'
  return ''


def _load_files(data_cfg, which: tuple[str, ...]) -> list[str]:
  """The text of each split in `which` ('train', 'eval'), each file read once."""
  if 'test' in which:
    raise ConfigError("files: datasets have only train and validation text; set "
                      "--config.data.test_split='' or use a TFDS dataset")
  train, heldout, fraction = _split_files(data_cfg)
  if fraction:
    # max_bytes caps the whole read, before the cut.
    parts = dict(zip(('train', 'eval'), _cut(_checked(data_cfg, train), fraction)))
    return [parts[w] for w in which]
  # max_bytes caps each split on its own, so capping never empties the (last) heldout files.
  return [_checked(data_cfg, train if w == 'train' else heldout) for w in which]


def _checked(data_cfg, paths: list[str]) -> str:
  """The files' text; an error for binary files under the char tokenizer, else a warning."""
  text, problems = _read_files(paths, data_cfg.max_bytes, data_cfg)
  if not problems:
    return text
  binary = {p: why for p, why in problems.items() if why.startswith(_BINARY)}
  if binary and data_cfg.tokenizer == 'char':
    raise ConfigError(f'{data_cfg.name!r} matched {len(binary)} binary file(s): '
                      f'{_list_files(binary)}; with data.tokenizer=char every byte value would '
                      'become a token. Narrow the glob to text files')
  print(f'warning: {data_cfg.name!r}: {len(problems)} file(s) are not UTF-8 text, so the '
        f'{data_cfg.tokenizer} tokenizer sees U+FFFD and control characters in their place: '
        f'{_list_files(problems)}. Convert them to UTF-8 (iconv -t utf-8) or narrow the glob',
        file=sys.stderr, flush=True)
  return text


def _list_files(problems: dict[str, str], at_most: int = 5) -> str:
  listed = '; '.join(f'{p} ({why})' for p, why in list(problems.items())[:at_most])
  return listed + (f' and {len(problems) - at_most} more' if len(problems) > at_most else '')


# ---------------------------------------------------------------------------------------------
# Tokens and batches.


@dataclasses.dataclass(frozen=True)
class Split:
  tokens: np.ndarray        # [N] uint16 (vocab <= 65536) or int32.
  bytes_per_token: float    # UTF-8 bytes of the text / tokens: bits per byte = nats / ln2 / this.
  chars_per_token: float    # Characters of the text / tokens, for bits per character.


def _make_split(text: str, tokenizer, name: str, seq_len: int) -> Split:
  ids = tokenizer.encode(text)
  if len(ids) < seq_len + 1:
    raise ConfigError(f'text corpus shorter than one sequence: the {name} split has {len(ids)} '
                      f'tokens but seq_len={seq_len} needs {seq_len + 1}; use more text or lower '
                      '--config.model.seq_len')
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  return Split(tokens=ids.astype(dtype),
               bytes_per_token=len(text.encode('utf-8')) / len(ids),
               chars_per_token=len(text) / len(ids))


class TextData:
  """Tokenized splits and the batches cut from them; see the module docstring."""

  def __init__(self, tokenizer, splits: dict[str, Split], *, batch_size: int, seq_len: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    batches.check_batch(batch_size, process_count)
    self.tokenizer = tokenizer
    self.splits = splits
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self.files = {}  # files: corpora: which files each split reads, for the start-up block.

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def tokens_per_batch(self) -> int:
    """Tokens in one global batch (all processes)."""
    return self.batch_size * self.seq_len

  @property
  def steps_per_epoch(self) -> int:
    """Steps to draw as many windows' tokens as the train split holds (train.epochs)."""
    return max(1, len(self.train_tokens) // self.tokens_per_batch)

  @property
  def train_tokens(self) -> np.ndarray:
    return self.splits['train'].tokens

  @property
  def eval_tokens(self) -> np.ndarray:
    return self.splits['eval'].tokens

  def bytes_per_token(self, split: str = 'eval') -> float:
    return self.splits[split].bytes_per_token

  def chars_per_token(self, split: str = 'eval') -> float:
    return self.splits[split].chars_per_token

  def _batch(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Starts uniform over [0, N - L - 1] as nanoGPT: the last target is tokens[N - 1].
    starts_G = rng.integers(0, len(tokens) - self.seq_len, size=self.batch_size)
    starts_B = batches.local(starts_G, self.process_index, self.process_count)
    windows_BxL1 = tokens[starts_B[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
    return {'tokens': windows_BxL1[:, :-1], 'targets': windows_BxL1[:, 1:]}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global training batch for `step`."""
    return self._batch(self.train_tokens, np.random.default_rng([self.seed, step]))

  def eval_batches(self, num_batches: int, split: str = 'eval') -> list[dict[str, np.ndarray]]:
    """The same `num_batches` random windows of `split` every call, whatever the seed."""
    tokens = self.splits[split].tokens
    return [self._batch(tokens, np.random.default_rng([_EVAL_STREAM, _SPLIT_IDS[split], i]))
            for i in range(num_batches)]


def make_text_data(config, tokenizer=None, process_index: int = 0,
                   process_count: int = 1) -> TextData:
  """Loads and tokenizes the corpus; `tokenizer` (e.g. reloaded on resume) skips building one."""
  data_cfg = config.data
  train_text, eval_text = load_text(data_cfg)
  if tokenizer is None:
    tokenizer = tokenizer_lib.build(data_cfg, train_text)
  seq_len = config.model.seq_len
  splits = {'train': _make_split(train_text, tokenizer, 'train', seq_len),
            'eval': _make_split(eval_text, tokenizer, 'eval', seq_len)}
  if data_cfg.test_split:
    splits['test'] = _make_split(load_split(data_cfg, 'test'), tokenizer, 'test', seq_len)
  data = TextData(tokenizer, splits, batch_size=config.train.batch_size, seq_len=seq_len,
                  seed=config.seed, process_index=process_index, process_count=process_count)
  if data_cfg.name.startswith(_FILES):
    train, heldout, fraction = _split_files(data_cfg)
    if heldout:
      data.files = {'train files': _list(train), 'held-out files': _list(heldout)}
    else:
      why = (f'data.val_fraction={fraction:g}' if data_cfg.val_fraction else
             'data.val_fraction=0 means 0.1 for a single file')
      data.files = {'files': _list(train),
                    'validation': f'the last {fraction * 100:g}% of their bytes ({why})'}
  return data


def _list(paths: list[str]) -> str:
  return ', '.join(paths) if len(paths) <= 3 else f'{len(paths)} ({paths[0]} ... {paths[-1]})'



# ---------------------------------------------------------------------------------------------
# The tokenizer in the workdir.


def _tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer.json')


def save_tokenizer(workdir: str, tokenizer) -> None:
  """Writes `<workdir>/tokenizer.json` atomically: readers never see a partial file."""
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_atomic(_tokenizer_path(workdir), json.dumps(tokenizer.to_json()))


def load_tokenizer(workdir: str):
  """Reads the tokenizer a training run saved in `workdir`."""
  path = _tokenizer_path(workdir)
  if not os.path.isfile(path):
    raise ConfigError(f'no tokenizer.json in {workdir!r}: train there first (or pass the '
                      'workdir a training run wrote)')
  with open(path) as f:
    return tokenizer_lib.from_json(json.load(f))
