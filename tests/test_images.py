"""The CIFAR input pipeline on a small slice of the prepared data in ../shared/tfds."""

import os

import numpy as np
import pytest

from lm import config as base
from lm import images
from lm.config import ConfigError

DATA_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'tfds')
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, 'cifar10')),
                                reason=f'no prepared cifar10 in {DATA_DIR} (../shared/tfds)')
N = 300  # Examples read per split: enough for a few batches, fast to decode.


def _config(**data):
  c = base.get_config()
  c.task = 'classify'
  c.data.name = 'cifar10'
  c.data.data_dir = DATA_DIR
  c.data.val_fraction = 0.2
  c.data.cutout = 8
  c.train.batch_size = 16
  for k, v in data.items():
    c.data[k] = v
  return c


def _data(config=None, process_index=0, process_count=1):
  config = config or _config()
  config.data.max_examples = N
  return images.make_image_data(config, process_index, process_count)


@pytest.fixture(scope='module')
def data():
  return _data()


def test_attributes_and_held_out_validation_are_disjoint(data):
  assert (data.num_train, data.steps_per_epoch, data.num_classes) == (240, 15, 10)
  assert data.class_names[:2] == ('airplane', 'automobile')
  train, val = set(data.splits['train'].ids_N), set(data.splits['validation'].ids_N)
  assert len(train) == 240 and len(val) == 60 and not train & val
  everything = images.load_split('cifar10', 'train', DATA_DIR, max_examples=N)
  assert train | val == set(everything.ids_N)


def test_train_batch_is_a_pure_function_of_seed_and_step(data):
  batch = data.train_batch(20)
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  data.train_batch(3)
  for again in (data.train_batch(20), _data().train_batch(20)):  # Resume; a new process.
    np.testing.assert_array_equal(again['image'], batch['image'])
    np.testing.assert_array_equal(again['label'], batch['label'])
  assert not np.array_equal(data.train_batch(21)['image'], batch['image'])
  other_seed = _config()
  other_seed.seed = 1
  assert not np.array_equal(_data(other_seed).train_indices(20), data.train_indices(20))


def test_an_epoch_visits_distinct_examples_and_the_next_reshuffles(data):
  epoch0 = np.concatenate([data.train_indices(s) for s in range(15)])
  assert len(np.unique(epoch0)) == 15 * 16 and epoch0.max() < 240
  assert not np.array_equal(data.train_indices(15), data.train_indices(0))


def test_process_slices_are_disjoint_and_make_up_the_global_batch(data):
  parts = [_data(process_index=i, process_count=2).train_batch(5) for i in range(2)]
  whole = data.train_batch(5)
  for key in ('image', 'label'):
    assert parts[0][key].shape[0] == 8
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_augmentation_changes_images_but_not_labels(data):
  plain = _data(_config(augment=False, cutout=0))
  a, b = data.train_batch(4), plain.train_batch(4)
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.allclose(a['image'], b['image'])
  # Without augmentation a batch is exactly the normalised stored images.
  raw = plain.splits['train'].images_NxHxWxC[plain.train_indices(4)]
  np.testing.assert_allclose(b['image'], (raw - plain.mean_C) / plain.std_C, rtol=1e-6)
  assert abs(b['image'].mean()) < 0.3 and 0.7 < b['image'].std() < 1.3


def test_crop_flip_and_cutout_geometry():
  image = np.arange(2 * 4 * 5 * 1, dtype=np.uint8).reshape(2, 4, 5, 1)
  pad = images._PAD
  centred = images.crop_flip(image, np.full(2, pad), np.full(2, pad), np.array([False, True]))
  np.testing.assert_array_equal(centred[0], image[0])
  np.testing.assert_array_equal(centred[1], image[1, :, ::-1])
  shifted = images.crop_flip(image, np.array([pad - 1, pad]), np.array([pad, pad + 2]),
                             np.zeros(2, bool))
  np.testing.assert_array_equal(shifted[0, 1:], image[0, :-1])  # Down one row...
  assert (shifted[0, 0] == 0).all()  # ...with zero padding above.
  np.testing.assert_array_equal(shifted[1, :, :3], image[1, :, 2:])
  mask = images.cutout_mask(np.array([10, 0]), np.array([10, 31]), 8, 32, 32)
  assert mask[0].sum() == 64 and mask[0, 6:14, 6:14].all()
  assert mask[1].sum() == 4 * 5  # Clipped at the corner: rows 0-3, columns 27-31.


@pytest.mark.parametrize('split, size', [('validation', 60), ('train', 240), ('test', N),
                                         ('test[:10]', 10)])
def test_eval_batches_cover_each_example_once(data, split, size):
  batches = data.eval_batches(split)
  assert all(b['image'].shape == (data.eval_batch_size, 32, 32, 3) for b in batches)
  mask = np.concatenate([b['valid'] for b in batches])
  assert mask.sum() == size and (mask[:size] == 1).all()
  targets = np.concatenate([b['label'] for b in batches])[:size]
  np.testing.assert_array_equal(targets, data._split(split).labels_N)


def test_eval_batches_split_between_processes(data):
  whole = data.eval_batches('validation')
  parts = [_data(process_index=i, process_count=4).eval_batches('validation') for i in range(4)]
  for j, batch in enumerate(whole):
    for key in ('image', 'label', 'valid'):
      np.testing.assert_array_equal(np.concatenate([p[j][key] for p in parts]), batch[key])


def test_channel_stats_are_exact():
  x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  mean_C, std_C = images.channel_stats(x)
  np.testing.assert_allclose(mean_C, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std_C, x.std(axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize('change, kwargs, match', [
    ({'val_fraction': 0.0}, {}, 'val_fraction'),
    ({'data_dir': '/nonexistent/tfds'}, {}, 'data_dir'),
    ({'name': 'mnist'}, {}, 'mnist'),
    ({}, {'process_count': 3}, 'processes'),
])
def test_bad_settings_raise_config_error(change, kwargs, match):
  with pytest.raises(ConfigError, match=match):
    _data(_config(**change), **kwargs).eval_batches('validation')


def test_unknown_split_raises_config_error(data):
  with pytest.raises(ConfigError, match='no split'):
    data.eval_batches('valid')


def test_class_count_mismatch_raises_config_error(tmp_path):
  from lm import tasks  # pylint: disable=g-import-not-at-top
  config = _config()
  config.data.max_examples = N
  config.model.update(name='simple_cnn', num_classes=100)
  with pytest.raises(ConfigError, match='num_classes=10'):
    tasks.build(config, str(tmp_path))


def _device_prepare(x, seed, **kwargs):
  import jax  # pylint: disable=g-import-not-at-top
  mean_C, std_C = np.array([120.0, 110.0, 100.0], np.float32), np.array([60.0, 50.0, 40.0],
                                                                        np.float32)
  f = jax.jit(lambda x, key: images.prepare_on_device(x, key, mean_C=mean_C, std_C=std_C,
                                                      **kwargs))
  return np.asarray(f(x, jax.random.key(seed))), mean_C, std_C


@pytest.mark.parametrize('pad_mode', ['constant', 'reflect'])
def test_device_augmentation_draws_the_host_crops_and_flips(pad_mode):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  offsets, flips = [], []
  for seed in range(12):
    out, mean_C, std_C = _device_prepare(x, seed, augment=True, cutout=0, pad_mode=pad_mode)
    assert out.shape == x.shape and out.dtype == np.float32
    for b in range(len(x)):
      # Exactly one of the host's 9 x 9 x 2 crops (each image is random, so no two match).
      match = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.allclose(out[b], (images.crop_flip(x[b:b + 1], [dy], [dx], [flip],
                                                        pad_mode)[0] - mean_C) / std_C,
                              atol=1e-5)]
      assert len(match) == 1, (seed, b, match)
      offsets += match[0][:2]
      flips.append(match[0][2])
  counts = np.bincount(offsets, minlength=9)
  # 384 uniform draws over 9 offsets: 42.7 each on average; 15 is > 4 standard deviations off.
  assert counts.min() > 15 and counts.max() < 75, counts
  assert 0.35 < np.mean(flips) < 0.65


def test_device_cutout_zeroes_the_host_cutout_area():
  x = np.full((64, 32, 32, 3), 200, np.uint8)  # Normalises to non-zero everywhere.
  areas = []
  for seed in range(10):
    out, _, _ = _device_prepare(x, seed, augment=False, cutout=8)
    zero_BxHxW = (out == 0).all(axis=-1)
    assert ((out == 0).any(axis=-1) == zero_BxHxW).all()  # Whole pixels, all channels.
    for z in zero_BxHxW:  # One axis-aligned rectangle of at most 8 x 8.
      rows, cols = np.nonzero(z.any(axis=1))[0], np.nonzero(z.any(axis=0))[0]
      assert len(rows) <= 8 and len(cols) <= 8 and z.sum() == len(rows) * len(cols)
      assert np.ptp(rows) + 1 == len(rows) and np.ptp(cols) + 1 == len(cols)
    areas += list(zero_BxHxW.sum(axis=(1, 2)))
  # The host's mean area over every centre, against 640 device draws.
  cy, cx = np.meshgrid(np.arange(32), np.arange(32))
  host = images.cutout_mask(cy.ravel(), cx.ravel(), 8, 32, 32).sum(axis=(1, 2)).mean()
  assert abs(np.mean(areas) - host) < 3, (np.mean(areas), host)


def test_device_preparation_is_a_function_of_the_key_and_eval_only_normalises():
  x = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  kwargs = dict(augment=True, cutout=8, pad_mode='reflect')
  a, mean_C, std_C = _device_prepare(x, 3, **kwargs)
  np.testing.assert_array_equal(_device_prepare(x, 3, **kwargs)[0], a)
  assert not np.array_equal(_device_prepare(x, 4, **kwargs)[0], a)
  plain = images.prepare_on_device(x, None, mean_C=mean_C, std_C=std_C, **kwargs)
  np.testing.assert_allclose(plain, (x - mean_C) / std_C, rtol=1e-6)


def test_on_device_batches_hold_the_stored_pixels():
  data = _data(_config(augment_on_device=True))
  batch = data.train_batch(7)
  assert batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(
      batch['image'], data.splits['train'].images_NxHxWxC[data.train_indices(7)])
  np.testing.assert_array_equal(data.train_batch(7)['image'], batch['image'])
  evals = data.eval_batches('validation')
  assert evals[0]['image'].dtype == np.uint8 and evals[0]['valid'].sum() == 60
