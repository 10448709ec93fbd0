"""A seconds-long image-classification config for tests (256 CIFAR-10 examples)."""

import os

from lm import config as base

SHARED_TFDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared',
                           'tfds')


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir=SHARED_TFDS, eval_split='test', max_examples=256,
                augment=True)
  c.model.name = 'simple_cnn'
  c.train.update(steps=300, batch_size=8, log_every=10, eval_every=0, checkpoint_every=25)
  c.optim.update(name='adam', lr=1e-3, schedule='constant', warmup_steps=0)
  return c
