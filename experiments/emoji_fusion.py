"""Emoji categories from the picture and the name: a CNN and a Transformer, fused.

  python -m lm.main --config=experiments/emoji_fusion.py --workdir=/tmp/mm \
      --config.data.data_dir=../shared/multimodal/emoji
  python -m lm.main --mode=eval --config=experiments/emoji_fusion.py --workdir=/tmp/mm \
      --config.data.data_dir=../shared/multimodal/emoji --config.data.eval_split=test

9 categories, test at the best-validation epoch (benchmarks/emoji_fusion.py; docs/MULTIMODAL.md):
concat 70.2% (73.7% at epoch 30), average 74.9% (macro-F1 0.685), gated 72.8%, attention 69.7%;
image_only 67.9%, text_only 63.1%. Target 82% missed; +7.0 points over the better single
modality. 28-32 min a run on a 2-core CPU shared with other jobs (load 13-26, six runs at
once); 2-5 min a run at load 1-7. 98 subcategories (label_key=subcategory, num_classes=98):
concat 53.3%, the best single modality 42.5%. The default stays concat: its validation
accuracy (77.8%) was the best; choosing average by its test figure would let the test split
choose.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'classify_multimodal'
  # Word tokens: the 400 most frequent train words (those seen in about two names or more), the
  # rest [UNK], so that training sees names with unknown words as the test split has them
  # (20% of its names have no train word at all) instead of memorising every rare name.
  c.data.update(name='', data_dir='', image_key='image', text_key='text', label_key='label',
                image_size=32, alpha='white', augment=True, flip=False, tokenizer='word',
                vocab_size=400, max_len=16, val_fraction=0.1, eval_split='validation',
                test_split='')
  c.model.update(fusion='concat', image_model='simple_cnn', num_classes=9, fusion_dim=128,
                 modality_dropout=0.4, num_layers=2, num_heads=4, d_model=64, seq_len=16,
                 causal=False, pool='mean', dropout=0.1, head_dropout=0.1)
  c.mesh.cpu_devices = 1  # Steps this small run faster on one CPU device than split.
  # 2,398 train examples / 32 = 74 steps an epoch: evaluate and checkpoint each epoch, and keep
  # every checkpoint, so the epoch that validates best can be tested (benchmarks/emoji_fusion.py).
  c.train.update(epochs=30, batch_size=32, log_every=74, eval_every_epochs=1,
                 checkpoint_every=74, keep_checkpoints=30)
  c.optim.update(name='adamw', lr=2e-3, schedule='cosine', warmup_steps=74, min_lr=1e-5,
                 weight_decay=0.05, clip_norm=1.0)
  return c
