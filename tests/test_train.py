"""End-to-end trainer tests on a tiny LM: equivalence across meshes, exact resume, golden step."""

import json
import os

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import train

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(**overrides):
  c = config_lib.load(os.path.join(HERE, 'tiny_config.py'))
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def run(config, workdir, devices=None):
  return train.Trainer(config, str(workdir), devices=devices).run()


def test_one_device_and_eight_devices_train_the_same(tmp_path):
  one = tiny(**{'mesh.data': 1})
  run(one, tmp_path / 'one', devices=jax.devices()[:1])
  eight = tiny(**{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2})
  result = run(eight, tmp_path / 'eight')
  a, b = losses(tmp_path / 'one'), losses(tmp_path / 'eight')
  assert sorted(a) == [5, 10, 15, 20]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)
  assert result['eval/loss'] < np.log(65)


def test_resume_is_exact(tmp_path):
  straight = tiny(**{'train.steps': 40, 'train.log_every': 1, 'train.checkpoint_every': 100})
  run(straight, tmp_path / 'straight')
  assert train.Trainer(straight, str(tmp_path / 'resumed')).run(stop_after=20) == {
      'stopped_at': 20}
  run(straight, tmp_path / 'resumed')  # A new Trainer: a restart, as after a crash.
  a, b = losses(tmp_path / 'straight'), losses(tmp_path / 'resumed')
  assert sorted(a) == sorted(b) == list(range(1, 41))
  assert [a[s] for s in range(1, 41)] == [b[s] for s in range(1, 41)]  # To the last bit.
