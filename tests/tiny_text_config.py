"""A seconds-long text-classification config for tests: SMS spam, a one-block encoder."""

import os

from lm import config as base

SMS_SPAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared',
                        'text', 'sms_spam')


def get_config():
  c = base.get_config()
  c.task = 'classify_text'
  c.data.update(name='', data_dir=SMS_SPAM, tokenizer='word', vocab_size=2000, max_len=32,
                val_fraction=0.1, eval_split='validation', test_split='test',
                positive_label='spam', eval_batch_size=256)
  c.model.update(num_layers=1, num_heads=2, d_model=16, seq_len=32, causal=False,
                 num_classes=2)
  c.mesh.cpu_devices = 1
  c.train.update(steps=40, batch_size=16, log_every=20, eval_every=20, checkpoint_every=20)
  c.optim.update(name='adam', lr=3e-3, schedule='constant', warmup_steps=0, weight_decay=0.0)
  return c
