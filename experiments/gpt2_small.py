"""GPT-2 small's shape on accelerators: 12 layers, 12 heads, 768 wide, context 1024, bfloat16.

124M parameters with GPT-2's 50,257-token vocab; 85.9M with the byte vocab (256) used here.

  python -m lm.main --config=experiments/gpt2_small.py --workdir=/tmp/gpt2 \
      --config.data.name='files:/data/openwebtext/*.txt' --config.mesh.fsdp=-1 --config.mesh.data=1

Byte-level by default so it runs on any text; point data.tokenizer at a SentencePiece model
(`python -m lm.tokenizer train ...`) for a GPT-2-like vocabulary. Not yet run on an accelerator
here: see docs/BENCHMARKS.md.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.data.name = 'tiny_shakespeare'
  c.data.tokenizer = 'byte'
  c.model.update(num_layers=12, num_heads=12, d_model=768, seq_len=1024, dropout=0.0,
                 dtype='bfloat16', pos='learned', tie_embeddings=True)
  c.train.update(steps=5000, batch_size=64, log_every=50, eval_every=1000, eval_batches=20,
                 checkpoint_every=1000)
  c.optim.update(lr=6e-4, warmup_steps=200, min_lr=6e-5, b1=0.9, b2=0.95, weight_decay=0.1)
  return c
