"""`python -m lm.prepare` turns the real source formats into TFDS datasets TFDS reads back.

The sources are tiny files in the genuine layouts (CIFAR-10's pickled python batches in a
tar.gz, MNIST's IDX files, Shakespeare's input.txt); nothing here touches the network.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import prepare

TFDS_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'tfds')
CIFAR_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
               'truck']


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(url, path):
    raise AssertionError(f'a test tried to download {url}')
  monkeypatch.setattr(prepare, '_fetch', refuse)


def _run(argv, capsys):
  """(exit code, stdout, stderr) of the command line."""
  code = prepare.run(argv)
  out, err = capsys.readouterr()
  return code, out, err


def _leftovers(data_dir):
  return sorted(os.path.relpath(os.path.join(d, f), data_dir)
                for d, dirs, files in os.walk(data_dir) for f in dirs + files)


# ---------------------------------------------------------------------------------------------
# Sources in their real formats.


def _cifar_pickle(obj) -> bytes:
  # Python 2 wrote the real batches; their arrays refer to `numpy.core`, as these do.
  return pickle.dumps(obj, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')


def _cifar_arrays(n_per_batch=3, n_test=4, seed=0):
  rng = np.random.default_rng(seed)
  train = [(rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n_per_batch)) for _ in range(5)]
  test = (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_test))
  return train, test


def _cifar_files(train, test) -> dict[str, bytes]:
  """The files of cifar-10-batches-py: dicts with b'data' rows of R, G, B planes."""
  def batch(images_NxHxWxC, labels_N, label):
    return _cifar_pickle({
        b'batch_label': label,
        b'labels': [int(l) for l in labels_N],
        b'data': images_NxHxWxC.transpose(0, 3, 1, 2).reshape(len(labels_N), 3072),
        b'filenames': [f'img_{i}.png'.encode() for i in range(len(labels_N))]})
  files = {f'data_batch_{i + 1}': batch(*b, f'training batch {i + 1} of 5'.encode())
           for i, b in enumerate(train)}
  files['test_batch'] = batch(*test, b'testing batch 1 of 1')
  files['batches.meta'] = _cifar_pickle({
      b'num_cases_per_batch': 10000, b'num_vis': 3072,
      b'label_names': [n.encode() for n in CIFAR_NAMES]})
  return files


def _tarball(path, files, folder='cifar-10-batches-py'):
  with tarfile.open(path, 'w:gz') as tar:
    for name, blob in files.items():
      info = tarfile.TarInfo(f'{folder}/{name}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return str(path)


def _idx(array: np.ndarray, magic: int) -> bytes:
  return np.array([magic, *array.shape], '>u4').tobytes() + array.astype(np.uint8).tobytes()


def _mnist_dir(folder, n_train=5, n_test=3, gz=('train-images-idx3-ubyte',), seed=0):
  """The four IDX files (the ones named in `gz` gzipped); returns the arrays written."""
  rng = np.random.default_rng(seed)
  arrays = {'train': (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n_train)),
            'test': (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, n_test))}
  os.makedirs(folder, exist_ok=True)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images, labels = arrays[split]
    for stem, blob in ((f'{prefix}-images-idx3-ubyte', _idx(images, 2051)),
                       (f'{prefix}-labels-idx1-ubyte', _idx(labels, 2049))):
      name, blob = (stem + '.gz', gzip.compress(blob)) if stem in gz else (stem, blob)
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(blob)
  return arrays


def _read_images(data_dir, name, split):
  """{id or index: (image, label)} read back the way lm.images and TFDS users read it."""
  source = tfds.builder(name, data_dir=data_dir).as_data_source(split=split)
  return {(ex['id'].decode() if 'id' in ex else i): (ex['image'], ex['label'])
          for i, ex in enumerate(source[i] for i in range(len(source)))}


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.skipif(not os.path.isdir(os.path.join(TFDS_DIR, 'tiny_shakespeare')),
                    reason='needs ../shared/tfds/tiny_shakespeare')
def test_tiny_shakespeare_from_the_genuine_text_matches_tfds_own_copy(tmp_path, capsys):
  shared = os.path.join(TFDS_DIR, 'tiny_shakespeare', '1.0.0')
  splits = ('train', 'validation', 'test')
  texts = {s: tfds.builder('tiny_shakespeare', data_dir=TFDS_DIR).as_data_source(split=s)[0]
           ['text'] for s in splits}
  source = tmp_path / 'input.txt'
  source.write_bytes(b''.join(texts[s] for s in splits))  # The file TFDS downloads.
  assert hashlib.sha256(source.read_bytes()).hexdigest() == prepare._DOWNLOADS[
      'tiny_shakespeare'][0].sha256

  code, out, _ = _run(['tiny_shakespeare', f'--data_dir={tmp_path / "tfds"}',
                       f'--source={source}'], capsys)
  assert code == 0 and f'--config.data.data_dir={tmp_path / "tfds"}' in out
  ours = os.path.join(tmp_path, 'tfds', 'tiny_shakespeare', '1.0.0')
  for s in splits:
    assert tfds.data_source('tiny_shakespeare', split=s,
                            data_dir=str(tmp_path / 'tfds'))[0]['text'] == texts[s]
    record = f'tiny_shakespeare-{s}.array_record-00000-of-00001'
    with open(os.path.join(ours, record), 'rb') as a, open(os.path.join(shared, record), 'rb') as b:
      assert a.read() == b.read(), (f'{record} differs from the shared copy; legitimate only if '
                                    'a TFDS upgrade changed how it serializes or shuffles')
  with open(os.path.join(ours, 'features.json')) as a, open(
      os.path.join(shared, 'features.json')) as b:
    assert json.load(a) == json.load(b)
  with open(os.path.join(ours, 'dataset_info.json')) as a, open(
      os.path.join(shared, 'dataset_info.json')) as b:
    ours_info, shared_info = json.load(a), json.load(b)
  for key in ('name', 'version', 'fileFormat', 'splits'):
    assert ours_info[key] == shared_info[key], key


def test_tiny_shakespeare_splits_90_5_5_by_characters(tmp_path):
  text = 'Ça va?\n' + ''.join(chr(0x1F600 + i % 50) for i in range(193))  # Non-ASCII: chars.
  (tmp_path / 'input.txt').write_text(text, encoding='utf-8')
  splits = prepare.read_shakespeare(str(tmp_path))  # A dir holding input.txt also works.
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [180, 10, 10]
  assert ''.join(splits.values()) == text


def _check_cifar(data_dir, train, test):
  builder = tfds.builder('cifar10', data_dir=data_dir)
  assert str(builder.version) == '3.0.2'
  assert builder.info.features['label'].names == CIFAR_NAMES
  image = builder.info.features['image']
  assert (image.shape, image.np_dtype) == ((32, 32, 3), np.uint8)
  stored = builder.as_data_source(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  assert stored[0]['image'].startswith(b'\x89PNG'), 'images are stored as PNG (lossless)'
  assert builder.info.supervised_keys == ('image', 'label')
  for split, (images_NxHxWxC, labels_N) in (('train', [np.concatenate(p) for p in zip(*train)]),
                                            ('test', test)):
    examples = _read_images(data_dir, 'cifar10', split)
    assert sorted(examples) == [f'{split}_{i:05d}' for i in range(len(labels_N))]
    for i, (image_HxWxC, label) in enumerate(examples[f'{split}_{i:05d}'] for i in
                                             range(len(labels_N))):
      np.testing.assert_array_equal(image_HxWxC, images_NxHxWxC[i])
      assert label == labels_N[i]
  assert builder.info.splits['train'].num_examples == 15


def test_cifar10_round_trips_from_the_python_tarball(tmp_path, capsys):
  train, test = _cifar_arrays()
  source = _tarball(tmp_path / 'cifar-10-python.tar.gz', _cifar_files(train, test))
  data_dir = tmp_path / 'tfds'
  code, out, _ = _run(['cifar10', f'--data_dir={data_dir}', f'--source={source}'], capsys)
  assert code == 0 and out.rstrip().endswith(f'--config.data.data_dir={data_dir}')
  _check_cifar(str(data_dir), train, test)
  # tfds.data_source, the other way in, sees the same.
  test_source = tfds.data_source('cifar10', split='test', data_dir=str(data_dir))
  assert sorted(ex['id'].decode() for ex in test_source) == [f'test_{i:05d}' for i in range(4)]
  assert _leftovers(data_dir) == sorted(['cifar10', 'cifar10/3.0.2', *(
      f'cifar10/3.0.2/{f}' for f in ('dataset_info.json', 'features.json', 'label.labels.txt',
                                     'cifar10-train.array_record-00000-of-00001',
                                     'cifar10-test.array_record-00000-of-00001'))])


def test_cifar10_from_the_extracted_dir(tmp_path, capsys):
  train, test = _cifar_arrays(seed=1)
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  for name, blob in _cifar_files(train, test).items():
    (folder / name).write_bytes(blob)
  # The dir itself and the dir above it both work.
  for data_dir, source in ((tmp_path / 'a', folder), (tmp_path / 'b', tmp_path)):
    assert _run(['cifar10', f'--data_dir={data_dir}', f'--source={source}'], capsys)[0] == 0
    _check_cifar(str(data_dir), train, test)


def test_mnist_round_trips_from_idx_files_gzipped_or_not(tmp_path, capsys):
  arrays = _mnist_dir(tmp_path / 'src')
  data_dir = tmp_path / 'tfds'
  assert _run(['mnist', f'--data_dir={data_dir}', f'--source={tmp_path / "src"}'], capsys)[0] == 0
  builder = tfds.builder('mnist', data_dir=str(data_dir))
  assert str(builder.version) == '3.0.1' and 'id' not in builder.info.features
  assert builder.info.features['image'].shape == (28, 28, 1)
  assert builder.info.features['label'].num_classes == 10
  for split, (images_NxHxW, labels_N) in arrays.items():
    examples = _read_images(str(data_dir), 'mnist', split)
    assert len(examples) == len(labels_N)
    # No ids: match each example to its source row by pixels.
    rows = {images_NxHxW[i].tobytes(): i for i in range(len(labels_N))}
    for image_HxWxC, label in examples.values():
      assert image_HxWxC.shape == (28, 28, 1)
      assert labels_N[rows.pop(image_HxWxC[..., 0].tobytes())] == label
    assert not rows


# ---------------------------------------------------------------------------------------------
# Re-runs, interruptions, bad input.


def test_a_second_run_says_it_is_there_and_reads_no_source(tmp_path, capsys):
  _mnist_dir(tmp_path / 'src')
  argv = ['mnist', f'--data_dir={tmp_path / "tfds"}', f'--source={tmp_path / "src"}']
  assert _run(argv, capsys)[0] == 0
  before = _leftovers(tmp_path / 'tfds')
  code, out, err = _run(['mnist', f'--data_dir={tmp_path / "tfds"}'], capsys)  # No source.
  assert code == 0 and 'already prepared' in out and not err
  assert f'--config.data.data_dir={tmp_path / "tfds"}' in out
  assert _leftovers(tmp_path / 'tfds') == before


def test_an_interrupted_run_leaves_nothing_that_looks_prepared(tmp_path, capsys, monkeypatch):
  _mnist_dir(tmp_path / 'src')
  data_dir = str(tmp_path / 'tfds')
  real = prepare._image_examples

  def killed_after_two(*args, **kwargs):
    for i, example in enumerate(real(*args, **kwargs)):
      if i == 2:
        raise KeyboardInterrupt
      yield example
  monkeypatch.setattr(prepare, '_image_examples', killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    prepare.main(['mnist', f'--data_dir={data_dir}', f'--source={tmp_path / "src"}'])
  assert _leftovers(data_dir) == [] and not os.path.exists(data_dir)

  # A SIGKILL leaves TFDS's temp dir behind, even with its dataset_info.json written.
  stale = os.path.join(data_dir, 'mnist', 'incomplete.ABC123_3.0.1')
  os.makedirs(stale)
  with open(os.path.join(stale, 'dataset_info.json'), 'w') as f:
    f.write('{}')
  assert not tfds.builder('mnist', data_dir=data_dir).is_prepared()
  monkeypatch.setattr(prepare, '_image_examples', real)
  code, out, _ = _run(['mnist', f'--data_dir={data_dir}', f'--source={tmp_path / "src"}'], capsys)
  assert code == 0 and 'left by an interrupted run' in out and not os.path.exists(stale)
  assert tfds.builder('mnist', data_dir=data_dir).is_prepared()


def _bad_sources(tmp_path):
  """(name, source, a word the one-line error must contain) for wrong or broken sources."""
  train, test = _cifar_arrays()
  files = _cifar_files(train, test)
  text = tmp_path / 'input.txt'
  text.write_text('First Citizen:\n')
  no_test = _tarball(tmp_path / 'no_test.tar.gz', {k: v for k, v in files.items()
                                                   if k != 'test_batch'})
  bad_pickle = _tarball(tmp_path / 'bad.tar.gz', {**files, 'data_batch_3': b'not a pickle'})
  evil = _tarball(tmp_path / 'evil.tar.gz', {**files, 'data_batch_2': pickle.dumps(os.getcwd)})
  short = _tarball(tmp_path / 'short.tar.gz', {**files, 'data_batch_4': _cifar_pickle(
      {b'data': np.zeros((2, 3000), np.uint8), b'labels': [0, 1]})})
  (tmp_path / 'truncated.tar.gz').write_bytes(open(no_test, 'rb').read()[:200])
  _mnist_dir(tmp_path / 'mnist_bad_magic')
  with open(tmp_path / 'mnist_bad_magic' / 't10k-labels-idx1-ubyte', 'wb') as f:
    f.write(_idx(np.zeros(3), 2051))
  _mnist_dir(tmp_path / 'mnist_missing')
  os.remove(tmp_path / 'mnist_missing' / 't10k-images-idx3-ubyte')
  _mnist_dir(tmp_path / 'mnist_counts')
  with open(tmp_path / 'mnist_counts' / 't10k-labels-idx1-ubyte', 'wb') as f:
    f.write(_idx(np.zeros(2), 2049))
  (tmp_path / 'binary.txt').write_bytes(b'\x1f\x8b\x08\x00\xff\xfe')
  return [
      ('cifar10', str(text), 'not a CIFAR-10 python tarball'),
      ('cifar10', no_test, 'test_batch'),
      ('cifar10', bad_pickle, 'data_batch_3'),
      ('cifar10', evil, 'refusing'),
      ('cifar10', short, 'data_batch_4'),
      ('cifar10', str(tmp_path / 'truncated.tar.gz'), 'truncated.tar.gz'),
      ('cifar10', str(tmp_path / 'nothing_here.tar.gz'), 'does not exist'),
      ('mnist', str(tmp_path / 'mnist_bad_magic'), 't10k-labels-idx1-ubyte'),
      ('mnist', str(tmp_path / 'mnist_missing'), 't10k-images-idx3-ubyte'),
      ('mnist', str(tmp_path / 'mnist_counts'), '3 images but 2 labels'),
      ('mnist', str(text), 'has no train-images-idx3-ubyte'),
      ('tiny_shakespeare', str(tmp_path / 'binary.txt'), 'binary.txt'),
      ('tiny_shakespeare', no_test, 'no_test.tar.gz'),
  ]


def test_bad_sources_fail_with_one_line_and_write_nothing(tmp_path, capsys):
  for name, source, word in _bad_sources(tmp_path):
    data_dir = tmp_path / f'out_{name}'
    code, out, err = _run([name, f'--data_dir={data_dir}', f'--source={source}'], capsys)
    assert code == 2, (source, out, err)
    assert err.startswith('error: ') and err.count('\n') == 1 and word in err, err
    assert '--source=' in err, err  # Says what to pass instead.
    assert not os.path.exists(data_dir), (source, _leftovers(data_dir))


def test_unknown_name_and_list(tmp_path, capsys):
  code, _, err = _run(['imagenet', f'--data_dir={tmp_path}'], capsys)
  assert code == 2 and err.count('\n') == 1
  assert all(name in err for name in ('tiny_shakespeare', 'cifar10', 'mnist'))
  code, out, _ = _run(['--list'], capsys)
  assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [
      ['tiny_shakespeare', '1.0.0'], ['cifar10', '3.0.2'], ['mnist', '3.0.1']]
  assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Downloads (the fetch itself is faked: tests never reach the network).


def test_without_internet_it_says_to_pass_source(tmp_path, capsys, monkeypatch):
  def offline(url, path):
    open(path, 'wb').close()  # Partly written, as a dropped connection leaves it.
    raise prepare.urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))
  monkeypatch.setattr(prepare, '_fetch', offline)
  for name in prepare.BUILDERS:
    data_dir = tmp_path / name
    code, out, err = _run([name, f'--data_dir={data_dir}'], capsys)
    assert code == 2 and err.count('\n') == 1 and '--source=' in err
    assert prepare._DOWNLOADS[name][0].url in err and 'name resolution' in err
    assert not os.path.exists(data_dir), _leftovers(data_dir)


def test_download_checks_the_checksum_and_is_cached(tmp_path, capsys, monkeypatch):
  files = {}
  arrays = _mnist_dir(tmp_path / 'mirror', gz=('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                                               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))
  for name in os.listdir(tmp_path / 'mirror'):
    files[prepare._MNIST_URL + name] = (tmp_path / 'mirror' / name).read_bytes()
  fetched = []

  def fetch(url, path):
    fetched.append(url)
    with open(path, 'wb') as f:
      f.write(files[url])
  monkeypatch.setattr(prepare, '_fetch', fetch)
  data_dir = tmp_path / 'tfds'

  # The real checksums do not match these tiny files: refused, nothing kept.
  code, _, err = _run(['mnist', f'--data_dir={data_dir}'], capsys)
  assert code == 2 and 'SHA-256' in err and err.count('\n') == 1
  assert not os.path.exists(data_dir), _leftovers(data_dir)

  monkeypatch.setitem(prepare._DOWNLOADS, 'mnist', tuple(
      prepare._Download(url, hashlib.sha256(blob).hexdigest()) for url, blob in files.items()))
  fetched.clear()
  assert _run(['mnist', f'--data_dir={data_dir}'], capsys)[0] == 0
  assert sorted(fetched) == sorted(files)
  assert sorted(os.listdir(data_dir / 'downloads' / 'mnist')) == sorted(os.listdir(
      tmp_path / 'mirror'))
  assert len(_read_images(str(data_dir), 'mnist', 'train')) == len(arrays['train'][1])

  # Prepared again elsewhere from the same cache: nothing fetched.
  fetched.clear()
  (data_dir / 'mnist' / '3.0.1').rename(tmp_path / 'moved')
  assert _run(['mnist', f'--data_dir={data_dir}'], capsys)[0] == 0 and fetched == []


def test_pinned_checksums_are_the_ones_tfds_registers():
  registered = {}
  for path in (tfds.core.utils.tfds_path() / 'url_checksums' / 'mnist.txt',
               tfds.core.utils.tfds_path() / 'datasets' / 'tiny_shakespeare' / 'checksums.tsv'):
    registered.update(tfds.core.download.checksums.load_url_infos(path))
  for name in ('mnist', 'tiny_shakespeare'):
    for d in prepare._DOWNLOADS[name]:
      assert registered[d.url].checksum == d.sha256, d.url


def test_the_module_runs_as_a_command(tmp_path):
  _mnist_dir(tmp_path / 'src')
  command = [sys.executable, '-m', 'lm.prepare', 'mnist', f'--data_dir={tmp_path / "tfds"}']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bad = subprocess.run(command + [f'--source={tmp_path}'], cwd=root, capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 2 and bad.stderr.startswith('error: ') and bad.stderr.count('\n') == 1
  good = subprocess.run(command + [f'--source={tmp_path / "src"}'], cwd=root, capture_output=True,
                        text=True, check=False)
  assert good.returncode == 0, good.stderr
  assert good.stdout.rstrip().endswith(f'--config.data.data_dir={tmp_path / "tfds"}')
  with open(tmp_path / 'tfds' / 'mnist' / '3.0.1' / 'dataset_info.json') as f:
    assert json.load(f)['moduleName'] == 'lm.prepare'
