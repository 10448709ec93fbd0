"""CIFAR-10 ResNet-20 (He et al. 2016, 0.27M params) on a short schedule for a 2-core CPU.

  python -m lm.main --config=experiments/cifar10_resnet20.py --workdir=/tmp/cifar_r20 \
      --config.data.data_dir=../shared/tfds

This recipe: 16 epochs on all 50,000 training images (evaluated on test), batch 256, SGD
Nesterov 0.9, one-cycle (cosine) to a peak lr of 0.2 after 2 epochs, L2 5e-4 (not on BN),
label smoothing 0.1, random crop (4-pixel zero padding) and flip. It aims at 90%; the
published schedule below is the one that gets there.

The published schedule (He et al. 2016, Sec. 4.2): 64k iterations (~164 epochs) at batch 128,
lr 0.1 divided by 10 at 32k and 48k, momentum 0.9, weight decay 1e-4, no label smoothing:
  ... --config.train.epochs=0 --config.train.steps=64000 --config.train.batch_size=128 \
      --config.optim.schedule=step --config.optim.step_boundaries='(0.5,0.75)' \
      --config.optim.warmup_steps=0 --config.optim.lr=0.1 --config.optim.nesterov=False \
      --config.optim.weight_decay=1e-4 --config.train.label_smoothing=0
Reference: 91.25% test accuracy (8.75% error) with that schedule.
Result on CIFAR-10 (JPEG stand-in), 2026-11-23 17:08, the command above on the 2-core CPU
(AMD EPYC, otherwise idle; two CPU devices): 84.6% test accuracy after 16 epochs, 49 min 58 s
wall (~850-1050 ms per step of 256), peak RSS 1.5 GiB. Test accuracy every 2 epochs: 46.2,
63.7, 68.0, 71.2, 74.9, 82.0, 83.7, 84.6%. Below the 90% aim: an earlier 12-epoch run of
the same recipe reached 83.5% in 38 min 29 s, so the third of an hour more bought 1.1 points.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.0, augment=True, cutout=0,
                eval_split='test', test_split='')
  c.model.update(name='resnet20', num_classes=10, dtype='float32', width=1, dropout=0.0)
  # 50,000 / 256 = 195 steps per epoch.
  c.train.update(epochs=16, batch_size=256, log_every=50, eval_every=390,
                 checkpoint_every=390, label_smoothing=0.1)
  c.optim.update(name='sgd', lr=0.2, momentum=0.9, nesterov=True, schedule='onecycle',
                 warmup_steps=390, min_lr=1e-4, weight_decay=5e-4, clip_norm=0.0)
  return c
