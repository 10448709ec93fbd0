"""MNIST (5,000-image subset) with the classic 784-512-256-10 ReLU MLP, Adam 1e-3.

  python -m lm.main --config=experiments/mnist_mlp.py --workdir=/tmp/mnist \
      --config.data.data_dir=../shared/images/mnist_5k

Split files `train.npz` (4,000) and `test.npz` (1,000) via data.name=''. 10% of train held out
for validation (accuracy every epoch), test evaluated at the end. No augmentation (crops and
flips are for CIFAR; a flipped digit is another digit). Batch 32, 20 epochs, constant lr.
Reference: scikit-learn's MLPClassifier(hidden_layer_sizes=(512, 256), Adam, batch 32, 20
epochs) on the same 3,600 training images: 95.1% test (benchmarks/text_classification.py).
Result, 2026-11-30, the command above on the 2-core Intel Xeon CPU while other jobs loaded it
(load average 4.3-4.8): 96.1% test accuracy (94.5% on the 400 held-out validation images,
91-95% over the epochs), 535,818 params, 42 s wall including start-up and compilation
(5 min 16 s in the benchmark run at load 10-13).
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify'
  c.data.update(name='', data_dir='', val_fraction=0.1, augment=False, cutout=0,
                eval_split='validation', test_split='test')
  c.model.update(name='mlp', hidden=(512, 256), num_classes=10, dtype='float32')
  c.mesh.cpu_devices = 1  # A step this small runs faster on one CPU device than split.
  c.train.update(epochs=20, batch_size=32, log_every=100, eval_every_epochs=1,
                 checkpoint_every=10_000, label_smoothing=0.0)
  c.optim.update(name='adam', lr=1e-3, b1=0.9, b2=0.999, schedule='constant', warmup_steps=0,
                 weight_decay=0.0, clip_norm=0.0)
  return c
