"""Labelled text for classification (spam, news topics, sentiment): read, tokenize, batch.

A dataset is a prepared TFDS dataset (`data.name`, e.g. 'glue/sst2'), or with `data.name=''`
a directory of split files `<data_dir>/<split>.csv|.tsv|.jsonl`, each with a header (or JSON
keys) naming the `data.text_key` and `data.label_key` columns. Labels are kept as strings; their
vocabulary comes from the train split (ClassLabel order for TFDS, else sorted) and is saved as
`labels.json` in the workdir so resumed runs and evaluation map labels to the same ids.

Each split is tokenized once into a padded [N, L] matrix. Which rows make a batch is
`batches.Rows`'s job, so a batch is a pure function of (seed, step, process) and resume is exact.

Shape key: N examples, G global batch, B this process's rows, L `max_len` tokens, K classes.
"""

import csv
import dataclasses
import json
import os
import re
import tempfile

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from lm import batches
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.config import ConfigError

_FORMATS = ('.csv', '.tsv', '.jsonl')
_READ_CHUNK = 2000  # TFDS examples per `__getitems__` call.
_LABELS_FILE = 'labels.json'
_TRAIN_COUNTS_FILE = 'train_counts.json'


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split as read: texts, label strings, and where each example came from."""
  texts: list[str]
  labels: list[str]
  lines: list[int]   # File line where each example starts (TFDS: its index in the split).
  source: str        # "'<path>'" or "TFDS 'name' split 'x'", for error messages.
  unit: str = 'line'
  class_names: tuple[str, ...] | None = None  # TFDS ClassLabel names, in their order.

  def where(self, i: int) -> str:
    return f'{self.source} {self.unit} {self.lines[i]}'

  def take(self, idx) -> 'Examples':
    pick = lambda xs: [xs[i] for i in idx]
    return dataclasses.replace(self, texts=pick(self.texts), labels=pick(self.labels),
                               lines=pick(self.lines))


@dataclasses.dataclass(frozen=True)
class Split:
  """A tokenized split: every text padded or cut to L tokens."""
  tokens_NxL: np.ndarray  # int32, the pad id after each text's tokens.
  lengths_N: np.ndarray   # int32 real tokens per row, [CLS] included.
  labels_N: np.ndarray    # int32 index into the class names.


# ---------------------------------------------------------------------------------------------
# Split files: <data_dir>/<split>.csv|.tsv|.jsonl.


def _split_field(data_cfg, split: str) -> str:
  """The config field that named `split`, for the fix in error messages."""
  for field in ('train_split', 'eval_split', 'test_split'):
    if data_cfg[field] == split:
      return field
  return 'eval_split'


def _split_file(data_cfg, split: str) -> str | None:
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if not os.path.isdir(data_dir):
    raise ConfigError(f'data.data_dir={data_cfg.data_dir!r} is not a directory; point '
                      '--config.data.data_dir at a dir of <split>.csv|.tsv|.jsonl files, or '
                      'set --config.data.name to a TFDS dataset')
  found = [p for p in (os.path.join(data_dir, split + ext) for ext in _FORMATS)
           if os.path.isfile(p)]
  if len(found) > 1:
    raise ConfigError(f'split {split!r} has {len(found)} files in {data_dir!r} '
                      f'({", ".join(map(os.path.basename, found))}); keep only one of them')
  return found[0] if found else None


def _missing_split(data_cfg, split: str) -> ConfigError:
  data_dir = os.path.expanduser(data_cfg.data_dir)
  hint = (' (or hold out part of train with --config.data.val_fraction=0.1)'
          if split == 'validation' else '')
  return ConfigError(f'no {split}.csv, {split}.tsv or {split}.jsonl in {data_dir!r} (it has: '
                     f'{", ".join(sorted(os.listdir(data_dir))) or "nothing"}); set '
                     f'--config.data.{_split_field(data_cfg, split)} to a split it has{hint}')


def _column_error(path: str, key: str, have, data_cfg, what: str) -> ConfigError:
  field = 'label_key' if key == data_cfg.label_key else 'text_key'
  return ConfigError(f'{path!r} {what} has no {key!r} (it has: {", ".join(map(str, have))}); '
                     f'set --config.data.{field} or fix the file')


def _label(value, where: str) -> str:
  # Ints and strings alike become strings ('0', 'spam'); stray spaces would make a new class.
  if isinstance(value, bytes):
    value = value.decode('utf-8', errors='replace')
  label = value.strip() if isinstance(value, str) else value
  if isinstance(value, bool) or not isinstance(value, (str, int)) or label == '':
    raise ConfigError(f'{where}: label {value!r} is not a class name; labels must be '
                      'non-empty strings or integers')
  return str(label)


def _text_key(keys, data_cfg) -> str:
  """data.text_key, or the first of its comma-separated names that `keys` has."""
  names = [k.strip() for k in data_cfg.text_key.split(',')]
  return next((k for k in names if k in keys), names[0])


def _read_delimited(path: str, data_cfg, with_labels: bool = True) -> Examples:
  """CSV (quoted fields may hold commas, quotes, newlines) or GLUE-style TSV.

  TSV is read with QUOTE_NONE: GLUE/SST-2 files never quote, so a field that starts with a
  quote is text (excel-tab's default would strip it and swallow tabs until the next quote).
  A TSV field therefore cannot hold a tab or a newline.
  """
  tsv = path.endswith('.tsv')
  fix = ('TSV fields cannot hold tabs or newlines; remove them or use .csv or .jsonl' if tsv else
         'quote fields that hold commas, quotes or newlines ("a, ""b""")')
  texts, labels, lines = [], [], []
  start = 1
  # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = (csv.reader(f, dialect='excel-tab', quoting=csv.QUOTE_NONE) if tsv
              else csv.reader(f, strict=True))
    try:
      header = next(reader, None)
      if header is None:
        raise ConfigError(f'{path!r} is empty; it needs a header row naming the '
                          f'{data_cfg.text_key!r} and {data_cfg.label_key!r} columns')
      text_key = _text_key(header, data_cfg)
      for key in (text_key, data_cfg.label_key)[:2 if with_labels else 1]:
        if key not in header:
          raise _column_error(path, key, header, data_cfg, 'line 1 (the header)')
      t = header.index(text_key)
      l = header.index(data_cfg.label_key) if with_labels else None
      start = reader.line_num + 1
      for row in reader:
        if row:  # csv yields [] for a blank line.
          if len(row) != len(header):
            raise ConfigError(f'{path!r} line {start}: {len(row)} fields but the header has '
                              f'{len(header)}; {fix}')
          texts.append(row[t])
          if with_labels:
            labels.append(_label(row[l], f'{path!r} line {start}'))
          lines.append(start)
        start = reader.line_num + 1
    except csv.Error as e:
      raise ConfigError(f'{path!r} line {start}: {e}; {fix}') from e
    except UnicodeDecodeError as e:
      raise ConfigError(f'{path!r} near line {start}: not UTF-8 ({e.reason}); save the file '
                        'as UTF-8') from e
  if not texts:
    raise ConfigError(f'{path!r} has a header but no rows; add examples or name another split')
  return Examples(texts, labels, lines, repr(path))


def _read_jsonl(path: str, data_cfg, with_labels: bool = True) -> Examples:
  texts, labels, lines = [], [], []
  n = 0
  with open(path, encoding='utf-8-sig') as f:
    try:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f'{path!r} line {n}: not JSON ({e.msg} at column {e.colno}); '
                            'write one JSON object per line') from e
        if not isinstance(obj, dict):
          raise ConfigError(f'{path!r} line {n}: a JSON {type(obj).__name__}, not an object; '
                            'write one {"text": ..., "label": ...} object per line')
        text_key = _text_key(obj, data_cfg)
        for key in (text_key, data_cfg.label_key)[:2 if with_labels else 1]:
          if key not in obj:
            raise _column_error(path, key, list(obj), data_cfg, f'line {n}')
        if not isinstance(obj[text_key], str):
          raise ConfigError(f'{path!r} line {n}: {text_key!r} is not a string; '
                            'fix the file or --config.data.text_key')
        texts.append(obj[text_key])
        if with_labels:
          labels.append(_label(obj[data_cfg.label_key], f'{path!r} line {n}'))
        lines.append(n)
    except UnicodeDecodeError as e:
      raise ConfigError(f'{path!r} near line {n + 1}: not UTF-8 ({e.reason}); save the file '
                        'as UTF-8') from e
  if not texts:
    raise ConfigError(f'{path!r} is empty; write one JSON object per line')
  return Examples(texts, labels, lines, repr(path))


TABLES = ('.csv', '.tsv', '.jsonl')


def read_texts(path: str, data_cfg) -> list[str]:
  """The text column of a CSV, TSV or JSONL file (data.text_key; labels not needed), for a
  language model pretraining on the text of labelled datasets."""
  reader = _read_jsonl if path.endswith('.jsonl') else _read_delimited
  return reader(path, data_cfg, with_labels=False).texts


# ---------------------------------------------------------------------------------------------
# TFDS.


def _tfds_builder(name: str, data_dir: str):
  """The builder of a dataset already prepared in `data_dir`; never downloads."""
  path = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  if not os.path.isdir(path):
    raise ConfigError(f'TFDS data dir {path!r} does not exist; pass --config.data.data_dir=<dir '
                      "with prepared datasets>, or --config.data.name='' for split files")
  try:
    builder = tfds.builder(name, data_dir=path)
  except Exception as e:  # pylint: disable=broad-except  TFDS raises many kinds here.
    raise ConfigError(f'cannot open TFDS dataset {name!r} in {path!r} '
                      f'({str(e).strip().splitlines()[0]}); fix --config.data.name') from e
  if not builder.is_prepared():
    raise ConfigError(f'TFDS dataset {name!r} is not prepared in {path!r}; point '
                      '--config.data.data_dir at a dir that has it')
  return builder


def _tfds_splits(builder) -> list[str]:
  return list(builder.info.splits.keys())


def _read_tfds(data_cfg, split: str) -> Examples:
  name, text_key, label_key = data_cfg.name, data_cfg.text_key, data_cfg.label_key
  builder = _tfds_builder(name, data_cfg.data_dir)
  known = _tfds_splits(builder)
  if re.match(r'[^\[]*', split).group(0) not in known:  # Slicing ('train[:10%]') is allowed.
    hint = ' (or data.val_fraction > 0 for a held-out validation split)'
    raise ConfigError(f'TFDS dataset {name!r} has no split {split!r}; it has '
                      f'{", ".join(known)}: set --config.data.{_split_field(data_cfg, split)}'
                      f'{hint if split == "validation" else ""}')
  features = builder.info.features
  for key in (text_key, label_key):
    if key not in features:
      field = 'text_key' if key == text_key else 'label_key'
      raise ConfigError(f'TFDS dataset {name!r} has no feature {key!r} (it has: '
                        f'{", ".join(features)}); set --config.data.{field}')
  label_feature = features[label_key]
  names = (tuple(label_feature.names) if isinstance(label_feature, tfds.features.ClassLabel)
           else None)
  try:
    source = builder.as_data_source(split=split)
  except ValueError as e:  # A slice that selects nothing.
    raise ConfigError(f'TFDS split {split!r} of {name!r} selects nothing ({e}); fix it') from e
  where = f'TFDS {name!r} split {split!r}'
  texts, labels = [], []
  for start in range(0, len(source), _READ_CHUNK):
    for ex in source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source))))):
      text = ex[text_key]
      texts.append(text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text)
      value = ex[label_key]
      if names is None:
        labels.append(_label(value.item() if isinstance(value, np.generic) else value,
                             f'{where} example {len(labels)}'))
      elif 0 <= value < len(names):
        labels.append(names[value])
      else:
        raise ConfigError(f'{where} example {len(labels)}: label {int(value)} is not a class of '
                          f'{label_key!r} (unlabelled splits, like GLUE test, use -1); '
                          f'evaluate a labelled split via --config.data.'
                          f'{_split_field(data_cfg, split)}')
  if not texts:
    raise ConfigError(f'{where} is empty; name a split with examples')
  return Examples(texts, labels, list(range(len(texts))), where, 'example', names)


# ---------------------------------------------------------------------------------------------
# Reading any split.


def has_split(data_cfg, split: str) -> bool:
  if data_cfg.name:
    return split in _tfds_splits(_tfds_builder(data_cfg.name, data_cfg.data_dir))
  return _split_file(data_cfg, split) is not None


def read_split(data_cfg, split: str) -> Examples:
  """Reads split `split` of the dataset `data_cfg` names (TFDS, or split files when name='')."""
  if data_cfg.name:
    return _read_tfds(data_cfg, split)
  path = _split_file(data_cfg, split)
  if path is None:
    raise _missing_split(data_cfg, split)
  return _read_jsonl(path, data_cfg) if path.endswith('.jsonl') else _read_delimited(path, data_cfg)


# ---------------------------------------------------------------------------------------------
# Labels.


def label_vocab(examples: Examples) -> tuple[str, ...]:
  """ClassLabel names where TFDS has them, else the sorted labels (numerically if all ints)."""
  if examples.class_names is not None:
    return examples.class_names
  labels = set(examples.labels)
  if all(re.fullmatch(r'-?\d+', label) for label in labels):
    return tuple(sorted(labels, key=int))  # '2' before '10'.
  return tuple(sorted(labels))


def label_ids(examples: Examples, names, saved: bool = False) -> np.ndarray:
  """int32 [N] class index of every example; a label outside `names` is a ConfigError.

  `saved`: `names` came from a run's labels.json rather than this train split.
  """
  index = {name: i for i, name in enumerate(names)}
  ids_N = np.fromiter((index.get(label, -1) for label in examples.labels), np.int32,
                      len(examples.labels))
  bad = np.flatnonzero(ids_N < 0)
  if len(bad):
    i = int(bad[0])
    shown = ', '.join(map(repr, names[:10])) + (', ...' if len(names) > 10 else '')
    known, fix = ((f'labels.json labels of the run ({shown})', 'start a fresh workdir to '
                   'train with it') if saved else
                  (f'training labels ({shown})', 'retrain with it in the train split'))
    raise ConfigError(f'{examples.where(i)}: label {examples.labels[i]!r} is not one of the '
                      f'{len(names)} {known}; fix the label, or {fix}')
  return ids_N


def labels_path(workdir: str) -> str:
  return os.path.join(workdir, _LABELS_FILE)


def save_labels(workdir: str, names) -> None:
  """Writes `<workdir>/labels.json` atomically: readers never see a partial file."""
  os.makedirs(workdir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f'.{_LABELS_FILE}.')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(list(names), f, ensure_ascii=False)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of the workdir.
    os.replace(tmp, labels_path(workdir))
  except BaseException:
    os.unlink(tmp)
    raise


def load_labels(workdir: str) -> tuple[str, ...]:
  """The class names a training run saved in `workdir`, in class-id order."""
  path = labels_path(workdir)
  if not os.path.isfile(path):
    raise ConfigError(f'no {_LABELS_FILE} in {workdir!r}: train there first (or pass the '
                      'workdir a training run wrote)')
  with open(path, encoding='utf-8') as f:
    names = json.load(f)
  if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
    raise ConfigError(f'{path!r} is not a JSON list of class names; delete it and retrain')
  return tuple(names)


def train_counts_path(workdir: str) -> str:
  return os.path.join(workdir, _TRAIN_COUNTS_FILE)


def save_train_counts(workdir: str, names, counts_K) -> None:
  """Writes the train split's examples per class, which evaluation needs without the split
  (the class weights, the steps of an epoch)."""
  workdir_lib.write_json(train_counts_path(workdir),
                         {name: int(n) for name, n in zip(names, counts_K)})


def load_train_counts(workdir: str, names) -> np.ndarray | None:
  """int64 [K] in the order of `names`, or None for a run that did not save them."""
  path = train_counts_path(workdir)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    counts = json.load(f)
  if not isinstance(counts, dict) or set(counts) != set(names):
    raise ConfigError(f'{path!r} does not count the classes of labels.json; delete it and '
                      'retrain')
  return np.array([counts[name] for name in names], np.int64)


# ---------------------------------------------------------------------------------------------
# Tokens.


def tokenize(texts, tokenizer, max_len: int, cls: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_NxL, lengths_N): each text's first tokens ([CLS] first if `cls`), then padding."""
  special = tokenizer_lib.specials(tokenizer)
  first = 1 if cls else 0
  room = max_len - first
  ids = [tokenizer.encode(text)[:room] for text in texts]
  lengths_N = np.fromiter(map(len, ids), np.int32, len(ids))
  tokens_NxL = np.full((len(ids), max_len), special.pad_id, np.int32)
  if cls:
    tokens_NxL[:, 0] = special.cls_id
  # A boolean-mask store fills row by row, the order of the concatenation: one copy for all.
  text_NxR = np.arange(room) < lengths_N[:, None]
  tokens_NxL[:, first:][text_NxR] = np.concatenate(ids + [np.zeros(0, np.int32)])
  return tokens_NxL, lengths_N + first


def make_split(examples: Examples, names, tokenizer, max_len: int, cls: bool,
               saved_labels: bool = False) -> Split:
  labels_N = label_ids(examples, names, saved_labels)
  tokens_NxL, lengths_N = tokenize(examples.texts, tokenizer, max_len, cls)
  no_text_N = lengths_N == (1 if cls else 0)
  if no_text_N.all():
    raise ConfigError(f'every text of {examples.source} is empty after tokenizing; check '
                      '--config.data.text_key names the text and the tokenizer fits its language')
  if no_text_N.any():
    logging.warning('%s: %d of %d texts have no tokens (first at %s %d)', examples.source,
                    no_text_N.sum(), len(no_text_N), examples.unit,
                    examples.lines[int(np.argmax(no_text_N))])
  # The share cut short is what tells a user whether data.max_len is too small.
  logging.info('%s: %d examples, %.1f%% cut to %d tokens', examples.source, len(lengths_N),
               100 * np.mean(lengths_N == max_len), max_len)
  return Split(tokens_NxL, lengths_N, labels_N)


# ---------------------------------------------------------------------------------------------
# Batches.


class TextClassData:
  """Training batches and whole-split evaluation batches of one process.

  Batches are dicts: `tokens` int32 [B, L], `token_mask` bool [B, L] (True at real tokens,
  [CLS] included), `label` int32 [B] and `valid` float32 [B] (0 on eval padding rows, which
  repeat example 0 so every row is a well-formed input). A row can have no real token when its
  text had none and `cls` is off; models that pool over tokens must not divide by zero.
  """

  def __init__(self, splits: dict[str, Split], class_names, tokenizer, *, batch_size: int,
               seed: int, cls: bool = False, oversample: bool = False, process_index: int = 0,
               process_count: int = 1, eval_batch_size: int = 0, loader=None,
               max_len: int = 0, class_counts=None):
    """`splits` has 'train', or (evaluation only) not: then `max_len` and the train split's
    `class_counts` (saved by the training run) stand in for it."""
    self.splits = splits  # 'train', maybe 'validation'; others join on first use.
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.tokenizer = tokenizer
    self.specials = tokenizer_lib.specials(tokenizer)
    self.cls = cls
    self.batch_size = batch_size  # Global.
    self.eval_batch_size = batches.eval_batch_size(eval_batch_size, batch_size)
    weights_N = None
    if 'train' in splits:
      self.max_len = splits['train'].tokens_NxL.shape[1]
      labels_N = splits['train'].labels_N
      self.class_counts = np.bincount(labels_N, minlength=self.num_classes)  # [K], for weights.
      weights_N = 1.0 / self.class_counts[labels_N] if oversample else None
    else:
      self.max_len = max_len
      self.class_counts = np.asarray(class_counts, np.int64)
    self._rows = batches.Rows(int(self.class_counts.sum()), batch_size, seed,
                              process_index=process_index, process_count=process_count,
                              weights_N=weights_N)
    self._loader = loader  # split name -> Split, for splits first asked for in eval_batches.
    list(self._rows.eval(0, self.eval_batch_size))  # Its batch check, now rather than mid-run.

  @property
  def num_train(self) -> int:
    return self._rows.num_examples

  @property
  def steps_per_epoch(self) -> int:
    return self._rows.steps_per_epoch

  @property
  def vocab_size(self) -> int:
    """What the model embeds: the tokenizer's ids plus appended specials."""
    return self.specials.vocab_size

  @property
  def pad_id(self) -> int:
    return self.specials.pad_id

  @property
  def cls_id(self) -> int:
    return self.specials.cls_id

  def _batch(self, split: Split, rows_B: np.ndarray, valid_B: np.ndarray) -> dict:
    return {'tokens': split.tokens_NxL[rows_B],
            'token_mask': np.arange(self.max_len) < split.lengths_N[rows_B, None],
            'label': split.labels_N[rows_B],
            'valid': valid_B.astype(np.float32)}

  def example_batch(self) -> dict[str, np.ndarray]:
    """One all-padding row with a training batch's keys, shapes and dtypes (for init)."""
    return {'tokens': np.full((1, self.max_len), self.pad_id, np.int32),
            'token_mask': np.zeros((1, self.max_len), bool),
            'label': np.zeros((1,), np.int32), 'valid': np.zeros((1,), np.float32)}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global training batch of step `step`."""
    if 'train' not in self.splits:
      raise ConfigError('this data was loaded to evaluate a trained run; it has no train split')
    rows_B = self._rows.local(self._rows.train(step))
    return self._batch(self.splits['train'], rows_B, np.ones(len(rows_B), bool))

  def has_split(self, name: str) -> bool:
    return name in self.splits or (self._loader is not None and self._loader.has(name))

  def split(self, name: str) -> Split:
    if name not in self.splits:
      if self._loader is None:
        raise ConfigError(f'split {name!r} was not loaded; name it in --config.data.eval_split')
      self.splits[name] = self._loader(name)
    return self.splits[name]

  def eval_batches(self, split: str) -> list[dict[str, np.ndarray]]:
    """The split once, in global batches padded with invalid rows; this process's rows."""
    data = self.split(split)
    return [self._batch(data, rows_B, valid_B)
            for rows_B, valid_B in self._rows.eval(len(data.labels_N), self.eval_batch_size)]


def _held_out(d, train: Examples) -> tuple[Examples, Examples]:
  """(train, validation): `data.val_fraction` of the train split, the same rows every time."""
  train_rows, val_rows = batches.hold_out(len(train.texts), d.val_fraction)
  if not len(val_rows):
    raise ConfigError(f'data.val_fraction={d.val_fraction} holds out no example of '
                      f'{len(train.texts)}; raise it or set it to 0')
  return train.take(train_rows), train.take(val_rows)


class _Loader:
  """Reads and tokenizes a split on first use. 'validation' comes out of the train split when
  data.val_fraction > 0 and the dataset has no validation split of its own."""

  def __init__(self, data_cfg, tokenized):
    self.d, self.tokenized = data_cfg, tokenized

  def _holds_out(self, split: str) -> bool:
    return (split == 'validation' and self.d.val_fraction > 0 and
            not has_split(self.d, 'validation'))

  def has(self, split: str) -> bool:
    return has_split(self.d, self.d.train_split if self._holds_out(split) else split)

  def __call__(self, split: str) -> Split:
    if self._holds_out(split):
      return self.tokenized(_held_out(self.d, read_split(self.d, self.d.train_split))[1])
    return self.tokenized(read_split(self.d, split))


def make(config, tokenizer=None, labels=None, process_index: int = 0, process_count: int = 1,
         *, cls: bool = False, train_counts=None) -> TextClassData:
  """Reads, tokenizes and batches the dataset `config.data` names.

  `tokenizer` and `labels` (class names, e.g. reloaded from the workdir on resume) skip
  building them from the train split. `cls` is the model's to ask for: a model that pools at
  a [CLS] token gets it first in every row. The train, eval and test splits are read now, so a
  bad file fails before training starts; other splits load on first `eval_batches`.

  `train_counts` (the train split's class counts, saved by the run that trained) builds data
  to evaluate with: it needs `tokenizer` and `labels`, reads the eval split now and nothing
  else (a held-out validation split reads train), so it works on a dir holding only that.
  """
  d = config.data
  max_len = d.max_len or config.model.seq_len
  if max_len < (2 if cls else 1):
    raise ConfigError(f'data.max_len={max_len} leaves no room for text; set '
                      '--config.data.max_len (or model.seq_len) higher')
  if not 0 <= d.val_fraction < 1:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in [0, 1)')
  batches.check_batch(config.train.batch_size, process_count)
  common = dict(batch_size=config.train.batch_size, seed=config.seed, cls=cls,
                oversample=d.oversample, process_index=process_index,
                process_count=process_count, eval_batch_size=d.eval_batch_size)
  if train_counts is not None:
    if tokenizer is None or labels is None:
      raise ValueError('evaluation data needs the saved tokenizer and labels')
    load = _Loader(d, lambda examples: make_split(examples, labels, tokenizer, max_len, cls,
                                                  saved_labels=True))
    splits = {d.eval_split: load(d.eval_split)} if d.eval_split else {}
    return TextClassData(splits, labels, tokenizer, loader=load, max_len=max_len,
                         class_counts=train_counts, **common)
  train = read_split(d, d.train_split)
  names = tuple(labels) if labels is not None else label_vocab(train)
  val = None
  if d.val_fraction > 0:
    if has_split(d, 'validation'):
      raise ConfigError(f'data.val_fraction={d.val_fraction} but the dataset has its own '
                        "'validation' split; set --config.data.val_fraction=0")
    train, val = _held_out(d, train)
  if d.train_fraction < 1:
    train = train.take(batches.subset(len(train.texts), d.train_fraction))
  if tokenizer is None:
    # Train texts only. A newline is no word, and at worst one unused char id.
    tokenizer = tokenizer_lib.build(d, '\n'.join(train.texts))
  load = _Loader(d, lambda examples: make_split(examples, names, tokenizer, max_len, cls,
                                                saved_labels=labels is not None))
  splits = {'train': load.tokenized(train)}
  if val is not None:
    splits['validation'] = load.tokenized(val)
  for split in (d.eval_split, d.test_split):
    if split and split not in splits:
      splits[split] = load(split)
  return TextClassData(splits, names, tokenizer, loader=load, **common)
