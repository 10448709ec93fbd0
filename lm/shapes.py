"""What `--dry_run` knows of a task's data without reading it: batch shapes, vocab, epoch size.

A stand-in has the attributes its task reads of the real data (`train_batch(step)` with the
real keys, shapes and dtypes, `vocab_size`, `steps_per_epoch`, class names, ...), taken from
the config, a tokenizer's model file or a TFDS dataset's metadata (its dataset_info.json),
never from an example. What cannot be known that way is assumed or left unknown (None), and
`describe()` says which; `lm.main --dry_run --plan_data` reads the data instead.

Shape key: B this process's rows, L sequence length, H height, W width, C channels.
"""

import dataclasses
import zipfile

import numpy as np

from lm import datasets
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError

# The char tokenizer's vocab is the training text's distinct characters, which a plan does not
# read; a byte's worth is a round guess that errs large for English (Shakespeare has 65).
ASSUMED_CHAR_VOCAB = 256
# Image datasets a plan may meet without their metadata: (H, W, C), train examples, classes.
_KNOWN_IMAGES = {'cifar10': ((32, 32, 3), 50_000, 10), 'cifar100': ((32, 32, 3), 50_000, 100),
                 'mnist': ((28, 28, 1), 60_000, 10), 'fashion_mnist': ((28, 28, 1), 60_000, 10)}


@dataclasses.dataclass
class Shapes:
  """Zero batches of the right shapes, and the sizes a task asks its data for."""

  example: dict          # name -> (shape of one example, dtype).
  rows: int              # This process's rows of a batch.
  lines: list[str]       # Where each number came from, for the plan.
  steps_per_epoch: int | None = None  # None: unknown without the data.
  vocab_size: int = 0    # Text: what the model embeds.
  tokens_per_batch: int = 0  # Language modelling: tokens in a global batch.
  max_len: int = 0       # Text classification: tokens per row.
  class_names: tuple[str, ...] = ()  # Classifiers.
  # Images: the stand-in batches are float pixels, normalised; the plan compiles the step
  # without data.augment_on_device's in-step crop and normalisation.
  on_device: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def class_counts(self) -> np.ndarray:
    # Class weights' values depend on these, not the shapes the plan compiles: ones stand in.
    return np.ones(self.num_classes, np.int64)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    del step
    return {k: np.zeros((self.rows, *shape), dtype) for k, (shape, dtype) in self.example.items()}

  def example_batch(self) -> dict[str, np.ndarray]:
    return {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in self.example.items()}

  def describe(self) -> list[str]:
    return self.lines


def _vocab(config, specials: bool) -> tuple[int, str]:
  """(vocab the model embeds, where that number comes from) without reading any text."""
  m, d = config.model, config.data
  if m.vocab_size:
    return m.vocab_size, 'model.vocab_size'
  name = d.tokenizer
  if name == 'word':
    # WordTokenizer keeps up to data.vocab_size words after its own 3 specials.
    return d.vocab_size + 3, f'word tokenizer: at most data.vocab_size={d.vocab_size} + 3 specials'
  if name == 'char':
    vocab, why = ASSUMED_CHAR_VOCAB, (
        f'ASSUMED {ASSUMED_CHAR_VOCAB} characters: the char tokenizer takes the training text\'s '
        'distinct characters, which --dry_run does not read; set --config.model.vocab_size or '
        'pass --plan_data to count them')
  else:
    tokenizer = tokenizer_lib.build(d, '')  # byte; sentencepiece reads its model file.
    vocab = tokenizer.vocab_size
    why = 'byte tokenizer' if name == 'byte' else f'SentencePiece model {d.tokenizer_path}'
  return (vocab + 2, why + ' + pad and [CLS]') if specials else (vocab, why)


def text(config, process_count: int = 1) -> Shapes:
  """The language model's data: windows of model.seq_len tokens."""
  d, seq_len = config.data, config.model.seq_len
  vocab, why = _vocab(config, specials=False)
  lines = [f'{d.name}: no text read (--dry_run); vocab {vocab:,} ({why})']
  if config.train.epochs > 0:
    lines.append(f'train.epochs={config.train.epochs:g}: the number of steps needs the token '
                 'count of the text; pass --plan_data to read it')
  return Shapes({'tokens': ((seq_len,), np.int32), 'targets': ((seq_len,), np.int32)},
                config.train.batch_size // process_count, lines, vocab_size=vocab,
                tokens_per_batch=config.train.batch_size * seq_len)


def _train_examples(n: int | None, d) -> int | None:
  """Training examples left of `n` after data.max_examples and the validation hold-out."""
  if n is None:
    return None
  if d.max_examples > 0:
    n = min(n, d.max_examples)
  return n - int(round(d.val_fraction * n))  # As batches.hold_out.


def _steps_per_epoch(n_train: int | None, batch_size: int) -> int | None:
  if n_train is None:
    return None
  if n_train < batch_size:
    raise ConfigError(f'train.batch_size={batch_size} exceeds the {n_train} training examples; '
                      'use a smaller batch')
  return n_train // batch_size  # As batches.Rows: the last partial batch is dropped.


def _split_count(info, split: str) -> int | None:
  try:
    return info.splits[split].num_examples  # Slices ('train[:10%]') too.
  except (KeyError, ValueError):
    return None


def _unknown_names(config) -> tuple[str, ...]:
  """model.num_classes stand-in names; data.positive_label among them, where two classes use it."""
  names = tuple(str(k) for k in range(config.model.num_classes))
  positive = config.data.positive_label
  if len(names) == 2 and positive and positive not in names:
    names = ('0', positive)
  return names


def _npz_header(path: str) -> tuple[int, ...]:
  """The shape of `image` in an .npz, from its .npy header alone."""
  try:
    with zipfile.ZipFile(path) as z, z.open('image.npy') as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
              np.lib.format.read_array_header_2_0)
      return read(f)[0]
  except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
    raise ConfigError(f'{path} has no readable image array ({e}); rewrite it with np.savez') from e


def images(config, process_count: int = 1) -> Shapes:
  """Image classification: shapes and counts from TFDS metadata, a known table or .npz headers."""
  d, batch = config.data, config.train.batch_size
  info = datasets.tfds_info(d.name, d.data_dir) if d.name else None
  names = None
  if info is not None:
    hwc, n = tuple(info.features['image'].shape), _split_count(info, d.train_split)
    names = tuple(info.features['label'].names)
    source = f'TFDS metadata of {d.name} in {d.data_dir or "the default data dir"}'
  elif d.name in _KNOWN_IMAGES:
    hwc, n, _ = _KNOWN_IMAGES[d.name]
    n = n if d.train_split == 'train' else None
    source = f'the standard {d.name} (not prepared in {d.data_dir or "the default data dir"})'
  elif not d.name:
    path = datasets.split_file(d.data_dir, d.train_split, ('.npz',))
    shape = _npz_header(path)
    hwc, n = (*shape[1:3], shape[3] if len(shape) == 4 else 1), shape[0]
    source = f'the header of {path}'
  else:
    raise ConfigError(f'--dry_run cannot tell the image shape of {d.name!r}: it is not prepared '
                      f'in {d.data_dir or "the default data dir"}; point --config.data.data_dir '
                      'at it or pass --plan_data')
  if None in hwc:
    raise ConfigError(f'{d.name!r} has images of varying size {hwc}; this trainer needs one size')
  names = names or _unknown_names(config)
  n_train = _train_examples(n, d)
  lines = [f'{d.name or "npz split files"}: no examples read (--dry_run); images '
           f'{"x".join(map(str, hwc))}, {len(names)} classes, '
           + (f'{n_train:,} training examples' if n_train is not None else
              'training examples unknown') + f' (from {source})']
  return Shapes({'image': (hwc, np.float32), 'label': ((), np.int32), 'valid': ((), np.float32)},
                batch // process_count, lines, _steps_per_epoch(n_train, batch),
                class_names=names)


def labelled_text(config, process_count: int = 1) -> Shapes:
  """Text classification: [CLS]-or-not token rows of data.max_len, classes from the config."""
  d, m, batch = config.data, config.model, config.train.batch_size
  vocab, why = _vocab(config, specials=d.tokenizer != 'word')
  max_len = d.max_len or m.seq_len
  info = datasets.tfds_info(d.name, d.data_dir) if d.name else None
  names, n = None, None
  if info is not None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (TFDS runs only)
    label = info.features[d.label_key] if d.label_key in info.features else None
    names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    n = _split_count(info, d.train_split)
  names = names or _unknown_names(config)
  n_train = _train_examples(n, d)
  lines = [f'{d.name or "split files in " + (d.data_dir or "(no data_dir)")}: no text read '
           f'(--dry_run); vocab {vocab:,} ({why}), {max_len} tokens per text, {len(names)} '
           'classes' + (f', {n_train:,} training examples (TFDS metadata)' if n_train is not None
                        else '')]
  if n_train is None and config.train.epochs > 0:
    lines.append(f'train.epochs={config.train.epochs:g}: the number of steps needs the count of '
                 'training examples, which split files do not state; pass --plan_data')
  return Shapes({'tokens': ((max_len,), np.int32), 'token_mask': ((max_len,), np.bool_),
                 'label': ((), np.int32), 'valid': ((), np.float32)}, batch // process_count,
                lines, _steps_per_epoch(n_train, batch), vocab_size=vocab, max_len=max_len,
                class_names=names)


def multimodal(config, process_count: int = 1) -> Shapes:
  """Image + text classification: data.image_size images, data.max_len token rows."""
  d, m, batch = config.data, config.model, config.train.batch_size
  if d.image_size <= 0:
    raise ConfigError('--dry_run cannot tell the image size with data.image_size=0 (as stored) '
                      'without reading an image; set --config.data.image_size or pass '
                      '--plan_data')
  vocab, why = _vocab(config, specials=d.tokenizer != 'word')
  max_len = d.max_len or m.seq_len
  channels = 3 if d.alpha == 'white' else 4
  hwc = (d.image_size, d.image_size, channels)
  names = _unknown_names(config)
  lines = [f'manifests in {d.data_dir or "(no data_dir)"}: nothing read (--dry_run); images '
           f'{"x".join(map(str, hwc))} (data.image_size, data.alpha={d.alpha}), vocab {vocab:,} '
           f'({why}), {max_len} tokens per text, {len(names)} classes']
  if config.train.epochs > 0:
    lines.append(f'train.epochs={config.train.epochs:g}: the number of steps needs the count of '
                 'training examples, which --dry_run does not read; pass --plan_data')
  return Shapes({'image': (hwc, np.float32), 'tokens': ((max_len,), np.int32),
                 'token_mask': ((max_len,), np.bool_), 'label': ((), np.int32),
                 'valid': ((), np.float32)}, batch // process_count, lines,
                vocab_size=vocab, max_len=max_len, class_names=names)
