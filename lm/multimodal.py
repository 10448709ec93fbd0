"""Image + text classification data: manifests of (image file, text, label), decoded once.

A dataset is a directory of `<split>.jsonl` manifests, one JSON object a line, with the image
path relative to the manifest (`data.image_key`), the text (`data.text_key`) and the label
(`data.label_key`). Every image is decoded once with Pillow into memory: made RGBA, resized to
`data.image_size` (box filter, alpha-premultiplied), and composited onto white (`data.alpha`
'white', the default: 3 channels, what a reader sees, and the input a CIFAR-trained image
tower expects) or composited with the alpha kept as a 4th channel ('channel'). Texts are
tokenized and labels mapped to ids by lm/labelled_text.py, so the tokenizers, the label
vocabulary and `labels.json` work as in text classification.

`data.val_fraction` holds out that fraction of the train split's distinct texts, with every
example that has one: the emoji data has each emoji twice (two vendors' drawings of one
name), and a held-out drawing whose twin was trained on would flatter validation.

Augmentation (`data.augment`): random crops of the image padded by 4 edge pixels (a shift of
up to 4 pixels), and with `data.flip` horizontal flips. Flips are off in the emoji experiment:
a mirrored "left arrow" contradicts its text and a mirrored flag or letter is no emoji.

Saved in the workdir and reused on resume and by `--mode=eval`: the tokenizer, the labels
and the train images' channel statistics. With those saved, `--mode=eval` needs only the
evaluated split's manifest (and its images) in `data.data_dir`, not the train split.

Batches are dicts: `image` float32 [B, S, S, C] (normalised), `tokens` int32 [B, L],
`token_mask` bool [B, L], `label` int32 [B], `valid` float32 [B] (0 on eval padding rows).

Shape key: N examples, G global batch, B this process's rows, S image side, C channels,
L tokens, K classes.
"""

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from lm import batches
from lm import images as images_lib
from lm import labelled_text
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.config import ConfigError

ALPHA = ('white', 'channel')
_STATS_FILE = 'image_stats.json'
_SHIFT = 4  # Random crops shift an image by up to this many pixels each way (images.crop_flip's).
_SPLIT_FIELDS = ('train_split', 'eval_split', 'test_split')


@dataclasses.dataclass(frozen=True)
class Manifest:
  """One split as read: its texts and labels (as labelled_text reads them) and image paths."""
  examples: labelled_text.Examples
  image_paths: list[str]  # Absolute.

  def take(self, idx) -> 'Manifest':
    return Manifest(self.examples.take(idx), [self.image_paths[i] for i in idx])


@dataclasses.dataclass(frozen=True)
class Split:
  images_NxSxSxC: np.ndarray  # uint8
  text: labelled_text.Split   # tokens [N, L], lengths [N], labels [N]


# ---------------------------------------------------------------------------------------------
# Manifests and images.


def _field(data_cfg, split: str) -> str:
  """The config field that named `split`, for the fix in error messages."""
  return next((f for f in _SPLIT_FIELDS if data_cfg[f] == split), 'eval_split')


def manifest_path(data_cfg, split: str) -> str:
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if not data_cfg.data_dir or not os.path.isdir(data_dir):
    raise ConfigError(f'data.data_dir={data_cfg.data_dir!r} is not a directory; point '
                      '--config.data.data_dir at a dir of <split>.jsonl manifests')
  return os.path.join(data_dir, split + '.jsonl')


def read_manifest(data_cfg, split: str) -> Manifest:
  path = manifest_path(data_cfg, split)
  if not os.path.isfile(path):
    have = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith('.jsonl'))
    hint = (' (or hold out part of train with --config.data.val_fraction=0.1)'
            if split == 'validation' else '')
    raise ConfigError(f'no {split}.jsonl in {os.path.dirname(path)!r} (it has: '
                      f'{", ".join(have) or "no .jsonl files"}); set --config.data.'
                      f'{_field(data_cfg, split)} to a split it has{hint}')
  keys = {data_cfg.image_key: 'image_key', data_cfg.text_key: 'text_key',
          data_cfg.label_key: 'label_key'}
  texts, labels, lines, paths = [], [], [], []
  root = os.path.dirname(os.path.abspath(path))
  n = 0
  try:
    with open(path, encoding='utf-8-sig') as f:
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
                            'write one {"image": ..., "text": ..., "label": ...} object a line')
        for key, field in keys.items():
          if key not in obj:
            raise ConfigError(f'{path!r} line {n} has no {key!r} (it has: {", ".join(obj)}); '
                              f'add it, or set --config.data.{field} to the key it uses')
        for key in (data_cfg.image_key, data_cfg.text_key):
          if not isinstance(obj[key], str):
            raise ConfigError(f'{path!r} line {n}: {key!r} is {obj[key]!r}, not a string; '
                              'fix the line')
        paths.append(os.path.join(root, obj[data_cfg.image_key]))
        texts.append(obj[data_cfg.text_key])
        labels.append(labelled_text.label_string(obj[data_cfg.label_key], f'{path!r} line {n}'))
        lines.append(n)
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path!r} near line {n + 1}: not UTF-8 ({e.reason}); save the file as '
                      'UTF-8') from e
  if not texts:
    raise ConfigError(f'{path!r} is empty; write one JSON object per line')
  return Manifest(labelled_text.Examples(texts, labels, lines, repr(path)), paths)


def load_image(path: str, size: int, alpha: str) -> np.ndarray:
  """uint8 [S, S, 3] composited onto white, or [S, S, 4] with the alpha kept ('channel')."""
  with Image.open(path) as image:
    rgba = image.convert('RGBA')  # Palette, greyscale and RGB images alike.
  if size and rgba.size != (size, size):
    # Pillow premultiplies RGBA by alpha to resize, so no colour bleeds from hidden pixels.
    rgba = rgba.resize((size, size), Image.Resampling.BOX)
  x_SxSx4 = np.asarray(rgba, np.float32)
  a_SxSx1 = x_SxSx4[..., 3:] / 255.0
  rgb_SxSx3 = x_SxSx4[..., :3] * a_SxSx1 + 255.0 * (1.0 - a_SxSx1)
  out = rgb_SxSx3 if alpha == 'white' else np.concatenate([rgb_SxSx3, x_SxSx4[..., 3:]], -1)
  return np.round(out).astype(np.uint8)


def load_images(manifest: Manifest, size: int, alpha: str) -> np.ndarray:
  """uint8 [N, S, S, C]; a missing or broken image is a ConfigError naming manifest and line."""
  ex = manifest.examples
  out = []
  for i, path in enumerate(manifest.image_paths):
    if not os.path.isfile(path):
      raise ConfigError(f'{ex.where(i)}: image {path!r} does not exist; fix the path (relative '
                        'to the manifest) or add the file')
    try:
      image = load_image(path, size, alpha)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise ConfigError(f'{ex.where(i)}: image {path!r} does not decode ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); replace the file or '
                        'drop the line') from e
    if out and image.shape != out[0].shape:
      raise ConfigError(f'{ex.where(i)}: image {path!r} is {image.shape[1]}x{image.shape[0]} '
                        f'but {manifest.image_paths[0]!r} is {out[0].shape[1]}x'
                        f'{out[0].shape[0]}; set --config.data.image_size to resize them all')
    out.append(image)
  return np.stack(out)


def hold_out_groups(keys, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, validation rows): a fixed random `fraction` of the distinct keys held out,
  each with every row that has it (batches.hold_out over the sorted distinct keys)."""
  distinct, group_N = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
  _, val_groups = batches.hold_out(len(distinct), fraction)
  val_N = np.isin(group_N, val_groups)
  return np.flatnonzero(~val_N), np.flatnonzero(val_N)


# ---------------------------------------------------------------------------------------------
# What a run saves besides tokenizer and labels.


def stats_path(workdir: str) -> str:
  return os.path.join(workdir, _STATS_FILE)


def save_stats(workdir: str, stats: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_json(stats_path(workdir), stats)


def load_stats(workdir: str) -> dict:
  with open(stats_path(workdir)) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# Batches.


class MultimodalData:
  """Training batches and whole-split evaluation batches of one process.

  `stats`: the train images' per-channel `mean` and `std` (pixel units), `image_shape`
  [S, S, C], `num_train` and `class_counts`, computed from the train split or reloaded from
  the workdir.
  Without a 'train' split (evaluating in a dir that has none) only `eval_batches` works.
  """

  def __init__(self, splits: dict[str, Split], class_names, tokenizer, stats: dict, *,
               batch_size: int, seed: int, augment: bool, flip: bool, cls: bool,
               max_len: int, process_index: int = 0, process_count: int = 1,
               eval_batch_size: int = 0, loader=None, data_cfg=None):
    self.splits = splits
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.tokenizer = tokenizer
    self.specials = tokenizer_lib.specials(tokenizer)
    self.cls, self.max_len = cls, max_len
    self.stats = stats
    self.mean_C = np.asarray(stats['mean'], np.float32)
    self.std_C = np.maximum(np.asarray(stats['std'], np.float32), 1e-3)  # A flat channel.
    self.image_shape = tuple(stats['image_shape'])
    self.batch_size = batch_size  # Global.
    self.eval_batch_size = batches.eval_batch_size(eval_batch_size, batch_size)
    self._augment, self._flip = augment, flip
    self.rows = batches.Rows(stats['num_train'], batch_size, seed,
                             process_index=process_index, process_count=process_count)
    self.class_counts = np.asarray(stats['class_counts'])  # [K], for class weights.
    self._loader = loader  # split name -> Split, for splits first asked for in eval_batches.
    self._data_cfg = data_cfg  # Where the loader looks, for has_split.
    list(self.rows.eval(0, self.eval_batch_size))  # Its batch check, now rather than mid-run.

  @property
  def steps_per_epoch(self) -> int:
    return self.rows.steps_per_epoch

  @property
  def vocab_size(self) -> int:
    return self.specials.vocab_size

  def _normalise(self, images_BxSxSxC: np.ndarray) -> np.ndarray:
    return (images_BxSxSxC.astype(np.float32) - self.mean_C) / self.std_C

  def _batch(self, split: Split, rows_B, valid_B, images_BxSxSxC) -> dict:
    text = split.text
    return {'image': images_BxSxSxC,
            'tokens': text.tokens_NxL[rows_B],
            'token_mask': np.arange(self.max_len) < text.lengths_N[rows_B, None],
            'label': np.where(valid_B, text.labels_N[rows_B], 0).astype(np.int32),
            'valid': valid_B.astype(np.float32)}

  def example_batch(self) -> dict:
    """One all-padding row with a batch's keys, shapes and dtypes (needs no train split)."""
    return {'image': np.zeros((1, *self.image_shape), np.float32),
            'tokens': np.full((1, self.max_len), self.specials.pad_id, np.int32),
            'token_mask': np.zeros((1, self.max_len), bool),
            'label': np.zeros((1,), np.int32), 'valid': np.zeros((1,), np.float32)}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of step `step`'s global batch, augmented and normalised."""
    if 'train' not in self.splits:
      raise ConfigError('training needs the train split, which data.data_dir has no manifest '
                        'of; point --config.data.data_dir at the training data')
    local = self.rows.local
    rows_B = local(self.rows.train(step))
    images = self.splits['train'].images_NxSxSxC[rows_B]
    if self._augment:
      # Drawn for the whole global batch, then sliced: independent of the process count.
      rng, g = self.rows.augment_rng(step), self.batch_size
      dy_B, dx_B = (local(rng.integers(0, 2 * _SHIFT + 1, g)) for _ in range(2))
      flip_B = local(rng.random(g) < 0.5) & self._flip
      # 'edge': an emoji's border is background (white, or alpha 0), so a shift shows more of it.
      images = images_lib.crop_flip(images, dy_B, dx_B, flip_B, 'edge')
    return self._batch(self.splits['train'], rows_B, np.ones(len(rows_B), bool),
                       self._normalise(images))

  def has_split(self, name: str) -> bool:
    if name in self.splits:
      return True
    return (not self._part_of_train(name) and self._data_cfg is not None and
            os.path.isfile(manifest_path(self._data_cfg, name)))

  def _part_of_train(self, name: str) -> bool:
    """Train and a validation split held out of it: loaded with train or not at all."""
    return name == 'train' or (name == 'validation' and self._data_cfg is not None and
                               self._data_cfg.val_fraction > 0)

  def split(self, name: str) -> Split:
    if name not in self.splits:
      if self._part_of_train(name):
        raise ConfigError(f'split {name!r} is part of the train split, which data.data_dir '
                          'has no manifest of; evaluate a split the dir has')
      self.splits[name] = self._loader(name)
    return self.splits[name]

  def eval_batches(self, split: str) -> list[dict[str, np.ndarray]]:
    """The split once, in global batches padded with invalid rows; this process's rows."""
    data = self.split(split)
    out = []
    for rows_B, valid_B in self.rows.eval(len(data.text.labels_N), self.eval_batch_size):
      x_BxSxSxC = self._normalise(data.images_NxSxSxC[rows_B])
      x_BxSxSxC[~valid_B] = 0.0
      out.append(self._batch(data, rows_B, valid_B, x_BxSxSxC))
    return out


def make(config, tokenizer=None, labels=None, stats=None, process_index: int = 0,
         process_count: int = 1, *, cls: bool = False, training: bool = True) -> MultimodalData:
  """Reads, decodes, tokenizes and batches the dataset `config.data` names.

  `tokenizer`, `labels` (class names) and `stats` reloaded from the workdir win over those the
  train split would give, so ids, classes and normalisation mean the same after a restart.
  Training reads the train, eval and test splits now, so a bad file fails before training
  starts. Built to evaluate (`training=False`) with all three saved, it reads the eval split
  (train too only when that is the held-out validation split); a test split, when the dir has
  its manifest, on first `eval_batches`.
  """
  d = config.data
  max_len = d.max_len or config.model.seq_len
  if max_len < (2 if cls else 1):
    raise ConfigError(f'data.max_len={max_len} leaves no room for text; set '
                      '--config.data.max_len (or model.seq_len) higher')
  if not 0 <= d.val_fraction < 1:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in [0, 1)')
  if d.alpha not in ALPHA:
    raise ConfigError(f'data.alpha={d.alpha!r} is unknown; use white (composite onto white) '
                      'or channel (keep the alpha as a 4th channel)')
  if d.image_size < 0:
    raise ConfigError(f'data.image_size={d.image_size} must be >= 0 (0 = as stored)')
  batches.check_batch(config.train.batch_size, process_count)
  saved = None not in (tokenizer, labels, stats)
  labels_saved = labels is not None
  held_out = d.val_fraction > 0 and d.eval_split == 'validation'
  read_train = training or not saved or held_out
  splits = {}
  if read_train:
    train = read_manifest(d, d.train_split)
    if labels is None:
      labels = labelled_text.label_vocab(train.examples)
    val = None
    if d.val_fraction > 0:
      if os.path.isfile(manifest_path(d, 'validation')):
        raise ConfigError(f'data.val_fraction={d.val_fraction} but the dataset has its own '
                          "validation.jsonl; set --config.data.val_fraction=0")
      train_rows, val_rows = hold_out_groups(train.examples.texts, d.val_fraction)
      if not len(val_rows):
        raise ConfigError(f'data.val_fraction={d.val_fraction} holds out no example of '
                          f'{len(train.image_paths)}; raise it or set it to 0')
      train, val = train.take(train_rows), train.take(val_rows)
    if tokenizer is None:
      tokenizer = tokenizer_lib.build(d, '\n'.join(train.examples.texts))  # Train texts only.

  def load(manifest: Manifest) -> Split:
    text = labelled_text.make_split(manifest.examples, labels, tokenizer, max_len, cls,
                                    saved_labels=labels_saved)
    return Split(load_images(manifest, d.image_size, d.alpha), text)

  if read_train:
    splits['train'] = load(train)
    if stats is None:
      mean_C, std_C = images_lib.channel_stats(splits['train'].images_NxSxSxC)
      stats = {'mean': mean_C.tolist(), 'std': std_C.tolist(),
               'image_shape': list(splits['train'].images_NxSxSxC.shape[1:]),
               'num_train': len(train.image_paths),
               'class_counts': np.bincount(splits['train'].text.labels_N,
                                           minlength=len(labels)).tolist()}
    if val is not None:
      splits['validation'] = load(val)
  loader = lambda split: _checked_shape(load(read_manifest(d, split)), stats, split)
  for split in (d.eval_split, d.test_split if training else ''):
    if split and split not in splits and not (split == 'validation' and d.val_fraction > 0):
      splits[split] = loader(split)
  return MultimodalData(splits, labels, tokenizer, stats, batch_size=config.train.batch_size,
                        seed=config.seed, augment=d.augment, flip=d.flip, cls=cls,
                        max_len=max_len, process_index=process_index,
                        process_count=process_count, eval_batch_size=d.eval_batch_size,
                        loader=loader, data_cfg=d)


def _checked_shape(split: Split, stats: dict, name: str) -> Split:
  shape = tuple(split.images_NxSxSxC.shape[1:])
  if shape != tuple(stats['image_shape']):
    raise ConfigError(f'split {name!r} has images of shape {shape} but training had '
                      f'{tuple(stats["image_shape"])}; set --config.data.image_size so they match')
  return split
