"""Every experiment file loads, is locked, and builds its model."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from lm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, 'experiments', '*.py')))


def test_there_are_experiments():
  names = {os.path.basename(p) for p in EXPERIMENTS}
  assert {'quickstart.py', 'shakespeare_char.py', 'gpt2_small.py'} <= names


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_experiment_loads_locks_and_builds(path):
  config = config_lib.load(path)
  with pytest.raises(AttributeError):
    config.train.stepz = 1  # Locked: a typo is an error, not a new field.
  if config.task == 'lm':
    from lm import model  # pylint: disable=g-import-not-at-top
    net = model.Transformer(model.TransformerConfig.from_config(config.model, vocab_size=256))
    inputs = jnp.zeros((1, config.model.seq_len), jnp.int32)
  elif config.task == 'classify_text':
    from lm import model  # pylint: disable=g-import-not-at-top
    net = model.Classifier.from_config(config.model, vocab_size=config.data.vocab_size + 3)
    inputs = jnp.zeros((1, config.data.max_len or config.model.seq_len), jnp.int32)
  else:
    from lm import cnn  # pylint: disable=g-import-not-at-top
    net = cnn.build(config.model)
    inputs = jnp.zeros((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), inputs, train=False))
  assert jax.tree.leaves(variables['params'])
  assert config.train.batch_size > 0 and config.optim.lr > 0


def test_experiment_in_a_sweep_expands():
  config_lib.load(os.path.join(ROOT, 'experiments', 'shakespeare_char.py'))
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'sc', os.path.join(ROOT, 'experiments', 'shakespeare_char.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  trials = module.sweep()
  assert len(trials) == 4
  config = module.get_config()
  for trial in trials:
    for key in trial:
      section, field = key.split('.')
      assert field in config[section]
