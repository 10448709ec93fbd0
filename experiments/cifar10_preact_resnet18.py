"""CIFAR-10 pre-activation ResNet-18 (He et al. 2016b, 11.2M params), cosine schedule, GPU.

  python -m lm.main --config=experiments/cifar10_preact_resnet18.py --workdir=/tmp/cifar_pa18 \
      --config.data.data_dir=../shared/tfds --config.model.dtype=bfloat16

200 epochs at batch 128 on all 50,000 training images, SGD momentum 0.9, lr 0.1 with cosine
decay to 0, weight decay 5e-4 (not on BN), random crop (4-pixel zero padding) and flip,
evaluated on test (the recipe of the widely used pytorch-cifar reproductions).
Reference: 95.1% test accuracy (kuangliu/pytorch-cifar's table for PreActResNet18).
Hardware / wall time / result on CIFAR-10 (JPEG stand-in): not yet run.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.0, augment=True, cutout=0,
                eval_split='test', test_split='')
  c.model.update(name='preact_resnet18', num_classes=10, dtype='float32', width=1,
                 dropout=0.0)
  # 50,000 / 128 = 390 steps per epoch; evaluate every 10 epochs.
  c.train.update(epochs=200, batch_size=128, log_every=100, eval_every=3900,
                 checkpoint_every=3900, label_smoothing=0.0)
  c.optim.update(name='sgd', lr=0.1, momentum=0.9, nesterov=False, schedule='cosine',
                 warmup_steps=0, min_lr=0.0, decay_steps=0, weight_decay=5e-4, clip_norm=0.0)
  return c
