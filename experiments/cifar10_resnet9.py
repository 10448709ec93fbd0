"""CIFAR-10 fast training: David Page's DAWNBench ResNet-9 (6.6M params), for a GPU.

  python -m lm.main --config=experiments/cifar10_resnet9.py --workdir=/tmp/cifar_r9 \
      --config.data.data_dir=../shared/tfds

24 epochs at batch 512 on all 50,000 training images, bfloat16 compute, SGD Nesterov 0.9,
one-cycle to lr 0.4 at epoch 5 then down to ~0, weight decay 5e-4 (not on BN), label smoothing
0.2, random crop (4-pixel reflect padding), flip and 8x8 cutout: settings drawn from "How to
train your ResNet" (myrtle.ai, 2018). Difference from Page: his schedule is piecewise linear,
not cosine. Evaluated on test, without test-time flips.
Reference: Page's series reaches 94% with this net in 24 epochs; airbench94 (Jordan 2024), a
different, smaller net with more tricks, reaches 94% in 3.3 s on an A100.
Hardware / wall time / result on CIFAR-10 (JPEG stand-in): not yet run.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='cifar10', data_dir='', val_fraction=0.0, augment=True, cutout=8,
                crop_padding='reflect', eval_split='test', test_split='')
  c.model.update(name='resnet9', num_classes=10, dtype='bfloat16', width=1, dropout=0.0)
  # 50,000 / 512 = 97 steps per epoch.
  c.train.update(epochs=24, batch_size=512, log_every=20, eval_every=485,
                 checkpoint_every=485, label_smoothing=0.2)
  c.optim.update(name='sgd', lr=0.4, momentum=0.9, nesterov=True, schedule='onecycle',
                 warmup_steps=485, min_lr=1e-4, weight_decay=5e-4, clip_norm=0.0)
  return c
