"""CIFAR-10 Wide ResNet 28-10 (Zagoruyko & Komodakis 2016, 36.5M params), for a GPU.

  python -m lm.main --config=experiments/cifar10_wrn28_10.py --workdir=/tmp/cifar_wrn \
      --config.data.data_dir=../shared/tfds --config.model.dtype=bfloat16

200 epochs at batch 128 on all 50,000 training images, SGD Nesterov 0.9, lr 0.1 multiplied by
0.2 at epochs 60, 120 and 160, weight decay 5e-4 (not on BN), random crop (4-pixel zero
padding) and flip, no dropout (add --config.model.dropout=0.3 for the paper's dropout run),
evaluated on test.
Reference: 96.0% test accuracy (4.00% error; 96.11% with dropout 0.3).
Hardware / wall time / result on CIFAR-10 (JPEG stand-in): not yet run.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.0, augment=True, cutout=0,
                eval_split='test', test_split='')
  c.model.update(name='wrn28_10', num_classes=10, dtype='float32', width=1, dropout=0.0)
  # 50,000 / 128 = 390 steps per epoch; evaluate every 10 epochs.
  c.train.update(epochs=200, batch_size=128, log_every=100, eval_every=3900,
                 checkpoint_every=3900, label_smoothing=0.0)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9, nesterov=True, schedule='step',
                 step_boundaries=(0.3, 0.6, 0.8), step_factor=0.2, warmup_steps=0,
                 weight_decay=5e-4, clip_norm=0.0)
  return c
