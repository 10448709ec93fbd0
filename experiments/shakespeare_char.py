"""Character-level Shakespeare: the shape of nanoGPT's CPU config, for a side-by-side race.

  python -m lm.main --config=experiments/shakespeare_char.py --workdir=/tmp/sh \
      --config.data.data_dir=../shared/tfds

4 layers, 4 heads, 128 wide, context 64, biases in every linear layer and LayerNorm (nanoGPT's
default), batch 12, 2000 steps, AdamW (beta2 0.99, weight decay 0.1), lr 1e-3 with 100 warmup
steps and cosine to 1e-4, clip 1.0, no dropout.
Result on the 2-core CPU, 2026-11-23: validation loss 1.865 at step 2000 (nanoGPT: 1.886);
step time, wall time and memory against nanoGPT run beside it: docs/BENCHMARKS.md.
"""

from lm import config as base
from lm import sweeps


def get_config():
  c = base.get_config()
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'char'
  c.model.update(num_layers=4, num_heads=4, d_model=128, seq_len=64, dropout=0.0,
                 pos='learned', norm='layernorm', mlp='gelu', tie_embeddings=True,
                 use_bias=True)
  c.train.update(steps=2000, batch_size=12, log_every=100, eval_every=250, eval_batches=20,
                 checkpoint_every=1000)
  c.optim.update(name='adamw', lr=1e-3, warmup_steps=100, min_lr=1e-4, b1=0.9, b2=0.99,
                 weight_decay=0.1, clip_norm=1.0)
  return c


def sweep():
  """Learning rate x warmup, 4 trials: python -m launch.sweep --config=<this file> ..."""
  return sweeps.grid({'optim.lr': [1e-3, 3e-3], 'optim.warmup_steps': [50, 200]})
