"""CIFAR-10 with a 3072-128-64-10 ReLU MLP on raw (normalised) pixels: the floor to beat.

  python -m lm.main --config=experiments/cifar10_mlp.py --workdir=/tmp/cifar_mlp \
      --config.data.data_dir=../shared/tfds

402,250 params, SGD lr 1e-3 momentum 0.9, batch 4, 2 epochs, no augmentation (the optimizer
settings of PyTorch's CIFAR-10 tutorial); 10% of train held out for validation, test at the end.
Reference: none published for this exact net; fully connected nets on CIFAR-10 pixels are
known to plateau far below CNNs.
Result on CIFAR-10 (JPEG stand-in), 2026-11-23 16:27, the command above on the 2-core CPU
(AMD EPYC, one CPU device: batch 4 does not split): 47.6% test accuracy (47.4% validation;
44.2% after epoch 1), 2 min 38 s wall, ~660 images/s, peak RSS 905 MiB. The "about 50%"
expected of this seed example; far below any CNN here.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.1, augment=False, cutout=0,
                eval_split='validation', test_split='test')
  c.model.update(name='mlp', num_classes=10, dtype='float32')
  # 45,000 / 4 = 11,250 steps per epoch.
  c.train.update(epochs=2, batch_size=4, log_every=1000, eval_every=11250,
                 checkpoint_every=11250, label_smoothing=0.0)
  c.optim.update(name='sgd', lr=1e-3, momentum=0.9, nesterov=False, schedule='constant',
                 warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
  return c
