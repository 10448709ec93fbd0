"""A seconds-long LM config for tests: python -m lm.main --config=tests/tiny_config.py ..."""

import os

from lm import config as base

SHARED_TFDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared',
                           'tfds')


def get_config():
  c = base.get_config()
  c.data.name = 'tiny_shakespeare'
  c.data.data_dir = SHARED_TFDS
  c.data.tokenizer = 'char'
  c.model.update(num_layers=2, num_heads=2, d_model=32, seq_len=16)
  c.train.update(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                 checkpoint_every=10)
  c.optim.update(lr=3e-3, warmup_steps=5, min_lr=3e-4)
  return c


def sweep():
  return [{'optim.lr': lr, 'seed': 0} for lr in (1e-3, 3e-3)]
