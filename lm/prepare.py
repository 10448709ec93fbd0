"""Writes a TFDS dataset the experiments read, without TensorFlow and without TFDS's downloads.

  python -m lm.prepare cifar10 --data_dir=~/tensorflow_datasets      # downloads the source
  python -m lm.prepare cifar10 --data_dir=DIR --source=cifar-10-python.tar.gz

TFDS's own builders cannot prepare these datasets here: they read their downloads with
`tf.io.gfile` and encode images with `tf.image.encode_png`. Each dataset below is a subclass of
TFDS's registered builder that keeps its `_info()` (features, version, splits) and its example
keys, and replaces only the reading of the source files (NumPy, with Pillow encoding the PNGs).
TFDS's `download_and_prepare` does the rest as it would for its own builder: shuffles by key,
writes array_record shards, dataset_info.json and features.json into an `incomplete.*` dir and
renames it to `<name>/<version>` at the end, so a killed run never looks prepared.

Shape key: N examples, H height, W width, C channels.
"""

import argparse
import dataclasses
import glob
import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from lm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class _Download:
  url: str
  sha256: str  # TFDS's registered checksum where it has one.


_MNIST_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
_DOWNLOADS = {
    'tiny_shakespeare': (_Download(
        'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),),
    # TFDS registers only the binary tarball; this is the python one's published SHA-256 (the
    # one Keras pins; MD5 c58f30108f718f92721af3b95e74349a on the CIFAR page).
    'cifar10': (_Download(
        'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        '6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce'),),
    'mnist': (
        _Download(_MNIST_URL + 'train-images-idx3-ubyte.gz',
                  '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609'),
        _Download(_MNIST_URL + 'train-labels-idx1-ubyte.gz',
                  '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c'),
        _Download(_MNIST_URL + 't10k-images-idx3-ubyte.gz',
                  '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6'),
        _Download(_MNIST_URL + 't10k-labels-idx1-ubyte.gz',
                  'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6'),
    ),
}
_SOURCES = {
    'tiny_shakespeare': "Shakespeare's input.txt (karpathy/char-rnn)",
    'cifar10': 'cifar-10-python.tar.gz or its extracted cifar-10-batches-py dir',
    'mnist': 'a dir holding the four MNIST idx files (train-images-idx3-ubyte etc., .gz or not)',
}


# ---------------------------------------------------------------------------------------------
# Reading the sources. Every problem is a one-line ConfigError naming the file.


def _why(e: BaseException) -> str:
  return ' '.join(str(e).split()) or type(e).__name__  # Errors print as one line.


def _fix(name: str) -> str:
  return f'pass --source=<{_SOURCES[name]}>'


def _read_bytes(path: str, name: str) -> bytes:
  if not os.path.isfile(path):
    raise ConfigError(f'{path} does not exist; {_fix(name)}')
  with open(path, 'rb') as f:
    return f.read()


def read_shakespeare(path: str) -> dict[str, str]:
  """{split: text}, cut exactly as TFDS's tiny_shakespeare builder cuts input.txt (90/5/5)."""
  if os.path.isdir(path):
    path = os.path.join(path, 'input.txt')
  raw = _read_bytes(path, 'tiny_shakespeare')
  try:
    text = raw.decode('utf-8')  # No newline translation: TFDS reads it with tf.io.gfile.
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path} is not UTF-8 text ({_why(e)}); {_fix("tiny_shakespeare")}') from e
  if not text or '\0' in text:
    raise ConfigError(f'{path} is empty or binary, not text; {_fix("tiny_shakespeare")}')
  i = int(len(text) * 0.9)
  train, rest = text[:i], text[i:]
  j = int(len(rest) * 0.5)
  return {'train': train, 'validation': rest[:j], 'test': rest[j:]}


_CIFAR_TRAIN = tuple(f'data_batch_{i}' for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, 'test_batch', 'batches.meta')
_CIFAR_FIX = _fix('cifar10')


def _cifar_blobs(path: str) -> dict[str, bytes]:
  """The batch files' bytes, from the tarball (read in place, never extracted) or a dir."""
  if os.path.isdir(path):
    inner = os.path.join(path, 'cifar-10-batches-py')
    folder = inner if os.path.isdir(inner) else path
    blobs = {f: _read_bytes(os.path.join(folder, f), 'cifar10')
             for f in _CIFAR_FILES if os.path.isfile(os.path.join(folder, f))}
  elif not os.path.isfile(path):
    raise ConfigError(f'{path} does not exist; {_CIFAR_FIX}')
  else:
    try:
      with tarfile.open(path) as tar:
        blobs = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar
                 if m.isfile() and os.path.basename(m.name) in _CIFAR_FILES}
    except tarfile.ReadError as e:  # Its text lists every compression tarfile tried.
      raise ConfigError(f'{path} is not a CIFAR-10 python tarball (not a tar archive); '
                        f'{_CIFAR_FIX}') from e
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      raise ConfigError(f'{path} is not a CIFAR-10 python tarball ({_why(e)}); {_CIFAR_FIX}') from e
  missing = [f for f in _CIFAR_FILES if f not in blobs]
  if missing:
    raise ConfigError(f'{path} has no {", ".join(missing)}; {_CIFAR_FIX}')
  return blobs


class _NumpyOnlyUnpickler(pickle.Unpickler):
  # Unpickling runs code; a CIFAR batch needs nothing but NumPy's array constructors.
  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
    return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
  try:
    d = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except  Any garbage raises something else.
    raise ConfigError(f'{where} is not a CIFAR-10 python pickle ({_why(e)}); {_CIFAR_FIX}') from e
  if not isinstance(d, dict):
    raise ConfigError(f'{where} holds a {type(d).__name__}, not a dict; {_CIFAR_FIX}')
  return d


def _cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  d = _unpickle(blob, where)
  data, labels_N = d.get(b'data'), np.asarray(d.get(b'labels', []))
  if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
      or data.shape[1] != 3 * 32 * 32 or labels_N.shape != (len(data),)
      or not np.isin(labels_N, np.arange(10)).all()):
    raise ConfigError(f"{where} is not a CIFAR-10 batch (b'data' uint8 [N, 3072], b'labels' "
                      f'N in 0-9); {_CIFAR_FIX}')
  # Rows are the red, green and blue 32x32 planes one after another.
  images_NxHxWxC = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images_NxHxWxC, labels_N


def read_cifar10(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
  """({split: (images uint8 [N, 32, 32, 3], labels [N])}, the 10 label names)."""
  blobs = _cifar_blobs(path)
  names = _unpickle(blobs['batches.meta'], f'{path}:batches.meta').get(b'label_names')
  if not isinstance(names, list) or len(names) != 10:
    raise ConfigError(f"{path}:batches.meta has no 10 b'label_names'; {_CIFAR_FIX}")
  # Popped as they are parsed: the raw batches are as big as the images.
  train = [_cifar_batch(blobs.pop(f), f'{path}:{f}') for f in _CIFAR_TRAIN]
  splits = {'train': tuple(np.concatenate(parts) for parts in zip(*train)),
            'test': _cifar_batch(blobs.pop('test_batch'), f'{path}:test_batch')}
  return splits, [n.decode() if isinstance(n, bytes) else str(n) for n in names]


_MNIST_FIX = _fix('mnist')


def _idx(folder: str, stem: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
  """The array in an IDX file (LeCun's format: big-endian magic, sizes, then uint8 data)."""
  paths = [p for p in (os.path.join(folder, stem), os.path.join(folder, stem + '.gz'))
           if os.path.isfile(p)]
  if not os.path.isdir(folder) or not paths:
    raise ConfigError(f'{folder} has no {stem} (or {stem}.gz); {_MNIST_FIX}')
  path = paths[0]
  raw = _read_bytes(path, 'mnist')
  try:
    raw = gzip.decompress(raw) if path.endswith('.gz') else raw
  except (OSError, EOFError, zlib.error) as e:
    raise ConfigError(f'{path} is not gzip ({_why(e)}); re-download it or {_MNIST_FIX}') from e
  header_bytes = 4 * (2 + len(item_shape))  # Magic, N, then the item's sizes.
  header = np.frombuffer(raw[:header_bytes], '>u4') if len(raw) >= header_bytes else [0, 0]
  if (header[0] != magic or tuple(int(n) for n in header[2:]) != item_shape
      or len(raw) != header_bytes + int(header[1]) * math.prod(item_shape)):
    raise ConfigError(f'{path} is not an MNIST IDX file (magic {magic}, N x '
                      f'{" x ".join(map(str, item_shape)) or "1"} uint8); {_MNIST_FIX}')
  return np.frombuffer(raw, np.uint8, offset=header_bytes).reshape(-1, *item_shape)


def read_mnist(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (images uint8 [N, 28, 28, 1], labels [N])} from the four IDX files."""
  splits = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images_NxHxW = _idx(folder, f'{prefix}-images-idx3-ubyte', 2051, (28, 28))
    labels_N = _idx(folder, f'{prefix}-labels-idx1-ubyte', 2049, ())
    if len(labels_N) != len(images_NxHxW) or labels_N.max(initial=0) > 9:
      raise ConfigError(f'{folder}: {prefix} has {len(images_NxHxW)} images but '
                        f'{len(labels_N)} labels (or a label > 9); {_MNIST_FIX}')
    splits[split] = images_NxHxW[..., None], labels_N
  return splits


# ---------------------------------------------------------------------------------------------
# TFDS's builders, reading the source given instead of downloading.


def _image_examples(images_NxHxWxC: np.ndarray, labels_N: np.ndarray, id_prefix: str = ''):
  # Keys are the example's index, as in TFDS's builders: TFDS shuffles by key, so the records
  # land in the same order as in a dataset TFDS prepared itself.
  for i, (image_HxWxC, label) in enumerate(zip(images_NxHxWxC, labels_N)):
    # A PIL image: TFDS encodes it to PNG with Pillow (it encodes arrays with TensorFlow).
    example = {'image': Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1
                                        else image_HxWxC),
               'label': int(label)}
    if id_prefix:
      example['id'] = f'{id_prefix}{i:05d}'
    yield i, example


class _FromSource:
  """Mixin: the builder reads `source` (a local file or dir) in `_split_generators`."""
  # TFDS 4.9.10 resolves `code_path` (to find a checksums file) with `importlib_resources`, which
  # it does not install on Python >= 3.9 (tensorflow/datasets#11212); these builders need none.
  code_path = None

  def __init__(self, *, source: str = '', **kwargs):
    self.source = source
    super().__init__(**kwargs)


class TinyShakespeare(_FromSource, tfds.builder_cls('tiny_shakespeare'), skip_registration=True):
  name = 'tiny_shakespeare'

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, text)
            for split, text in read_shakespeare(self.source).items()}


class Cifar10(_FromSource, tfds.builder_cls('cifar10'), skip_registration=True):
  name = 'cifar10'

  def _split_generators(self, dl_manager):
    del dl_manager
    splits, label_names = read_cifar10(self.source)
    self.info.features['label'].names = label_names
    return {split: _image_examples(*arrays, id_prefix=f'{split}_')
            for split, arrays in splits.items()}


class Mnist(_FromSource, tfds.builder_cls('mnist'), skip_registration=True):
  name = 'mnist'

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: _image_examples(*arrays) for split, arrays in read_mnist(self.source).items()}


BUILDERS = {b.name: b for b in (TinyShakespeare, Cifar10, Mnist)}


# ---------------------------------------------------------------------------------------------
# Downloading.


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _fetch(url: str, path: str) -> None:
  with urllib.request.urlopen(url, timeout=60) as response, open(path, 'wb') as f:
    shutil.copyfileobj(response, f, 1 << 20)


def download(name: str, data_dir: str) -> str:
  """Downloads `name`'s source files into data_dir/downloads/<name>; returns the --source."""
  folder = os.path.join(data_dir, 'downloads', name)
  os.makedirs(folder, exist_ok=True)
  for d in _DOWNLOADS[name]:
    path = os.path.join(folder, d.url.rsplit('/', 1)[1])
    if os.path.isfile(path) and _sha256(path) == d.sha256:
      continue  # Cached by an earlier run.
    print(f'downloading {d.url} to {path}', flush=True)
    partial = path + '.part'
    try:
      try:
        _fetch(d.url, partial)
      except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise ConfigError(f'cannot download {d.url} ({_why(getattr(e, "reason", e))}); without '
                          f'internet, download it elsewhere and {_fix(name)}') from e
      digest = _sha256(partial)
      if digest != d.sha256:
        raise ConfigError(f'{d.url} downloaded with SHA-256 {digest}, not {d.sha256}; retry, or '
                          f'download it elsewhere and {_fix(name)}')
      os.replace(partial, path)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return path if len(_DOWNLOADS[name]) == 1 else folder


# ---------------------------------------------------------------------------------------------
# The command.


def _builder(name: str, data_dir: str, source: str = ''):
  return BUILDERS[name](data_dir=data_dir, file_format='array_record', source=source)


def prepare(name: str, data_dir: str, source: str = '') -> str:
  """Writes dataset `name` into data_dir (downloading it when no source); returns its dir."""
  if name not in BUILDERS:
    raise ConfigError(f'unknown dataset {name!r}; pick one of {", ".join(BUILDERS)} (see '
                      'python -m lm.prepare --list)')
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = _builder(name, data_dir)
  # `builder.is_prepared()` would say the same, with a warning when it is not.
  if os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json')):
    print(f'{name} {builder.version} is already prepared in {builder.data_dir}; nothing to do')
    return builder.data_dir
  if source and not os.path.exists(source):
    raise ConfigError(f'--source={source} does not exist; {_fix(name)}')
  ours = [d for d in (data_dir, os.path.join(data_dir, name), os.path.join(data_dir, 'downloads'),
                      os.path.join(data_dir, 'downloads', name)) if not os.path.exists(d)]
  try:
    # A run killed mid-write leaves TFDS's temp dir; it can never be completed.
    for stale in glob.glob(os.path.join(data_dir, name, f'incomplete.*_{builder.version}')):
      print(f'removing {stale}, left by an interrupted run')
      shutil.rmtree(stale)
    builder = _builder(name, data_dir, os.path.abspath(source or download(name, data_dir)))
    # TFDS's download manager is unused; its scratch dirs go with the temp dir.
    with tempfile.TemporaryDirectory() as scratch:
      builder.download_and_prepare(
          download_dir=scratch,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except BaseException:
    for d in reversed(ours):  # Only the dirs this run created, and only when empty.
      if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    raise
  return builder.data_dir


def _describe() -> str:
  lines = []
  for name, b in BUILDERS.items():
    urls = [d.url for d in _DOWNLOADS[name]]
    base = os.path.commonprefix(urls).rsplit('/', 1)[0] + '/'
    lines.append(f'{name} {b.VERSION}  --source=<{_SOURCES[name]}>; without it, downloads '
                 f'{", ".join(u[len(base):] for u in urls)} from {base}')
  return '\n'.join(lines)


def main(argv=None) -> str:
  """`python -m lm.prepare <name> ...`; returns the prepared dataset's dir ('' for --list)."""
  parser = argparse.ArgumentParser(
      prog='python -m lm.prepare', description='Write a TFDS dataset the experiments read.',
      epilog=_describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', nargs='?', help=', '.join(BUILDERS))
  parser.add_argument('--data_dir', default=tfds.core.constants.DATA_DIR,
                      help='TFDS data dir to write into (default: %(default)s)')
  parser.add_argument('--source', default='',
                      help='a source file or dir you already have; downloads when not given')
  parser.add_argument('--list', action='store_true', help='list the datasets and exit')
  args = parser.parse_args(argv)
  if args.list:
    print(_describe())
    return ''
  if not args.name:
    raise ConfigError(f'name a dataset: python -m lm.prepare <{"|".join(BUILDERS)}> '
                      '--data_dir=DIR [--source=FILE_OR_DIR]')
  path = prepare(args.name, args.data_dir, args.source)
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
  print(f'{args.name} is in {path}; train on it with --config.data.data_dir={data_dir}')
  return path


def run(argv=None) -> int:
  """The command line's exit code: 0 when done, 2 with one line on stderr for bad input."""
  try:
    main(argv)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  # Through the imported module, so dataset_info.json records the builders' module as
  # lm.prepare rather than __main__.
  from lm import prepare  # pylint: disable=g-import-not-at-top,import-self
  sys.exit(prepare.run())
