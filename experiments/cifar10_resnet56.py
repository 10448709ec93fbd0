"""CIFAR-10 ResNet-56 (He et al. 2016, 0.85M params) with the paper's schedule, for a GPU.

  python -m lm.main --config=experiments/cifar10_resnet56.py --workdir=/tmp/cifar_r56 \
      --config.data.data_dir=../shared/tfds

64k iterations (~164 epochs) at batch 128 on all 50,000 training images, SGD momentum 0.9,
lr 0.1 divided by 10 at 32k and 48k, weight decay 1e-4 (not on BN), random crop (4-pixel zero
padding) and flip, evaluated on test.
Reference: 93.03% test accuracy (6.97% error).
Hardware / wall time / result on CIFAR-10 (JPEG stand-in): not yet run.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.0, augment=True, cutout=0,
                eval_split='test', test_split='')
  c.model.update(name='resnet56', num_classes=10, dtype='float32', width=1, dropout=0.0)
  c.train.update(steps=64000, epochs=0, batch_size=128, log_every=100, eval_every=2000,
                 checkpoint_every=2000, label_smoothing=0.0)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9, nesterov=False, schedule='step',
                 step_boundaries=(0.5, 0.75), step_factor=0.1, warmup_steps=0,
                 weight_decay=1e-4, clip_norm=0.0)
  return c
