"""A small causal Transformer LM on the text of the shared text datasets' train splits: the
run the text classifiers (sms_spam.py, sst2.py) fine-tune from with --config.init.workdir.

  python -m lm.main --config=experiments/text_pretrain.py --workdir=/tmp/pre

Corpus: the text column ('text' or 'sentence') of ../shared/text/*/train.* (AG News, SMS
spam, SST-2 train: about 6 MB, no labels read; the glob is relative to the
repository root, where the command runs); the last 5% of its bytes are the validation
split. No test split is read, so the classifiers' reported splits stay unseen. SentencePiece
(8,000 pieces) trained on the train part and saved in the workdir, where the classifiers
take it from. 4 causal blocks of width 128, context 64 (the classifiers read at most 64
tokens), learned positions; AdamW 3e-3, 30 warmup steps, cosine to 3e-4, batch 32, 300 steps.

Pointing it elsewhere: --config.data.name='files:<glob>' (any .txt, .csv, .tsv or .jsonl).
The classifier adopts this run's trunk (layers, heads, width, context) and tokenizer, so its
own model fields need not match.
Result, 2026-11-30, the command above on the 2-core Intel Xeon CPU shared with other jobs
(load average 12-26): validation loss 6.02 (2.19 bits per byte; 6.45 at step 150), 21 min
37 s wall. That is a barely trained LM (about 0.4 passes over the corpus); what it does for the
classifiers: docs/TRANSFER.md.
"""

from lm import config as base


def get_config():
  c = base.get_config()
  c.task = 'lm'
  c.data.update(name='files:../shared/text/*/train.*', text_key='text,sentence',
                val_fraction=0.05, tokenizer='sentencepiece', tokenizer_path='',
                vocab_size=8000)
  c.model.update(num_layers=4, num_heads=4, d_model=128, seq_len=64, pos='learned',
                 dropout=0.0)
  c.mesh.cpu_devices = 1  # A step this small runs faster on one CPU device than split.
  c.train.update(steps=300, batch_size=32, log_every=25, eval_every=150, eval_batches=20,
                 checkpoint_every=150)
  c.optim.update(name='adamw', lr=3e-3, schedule='cosine', warmup_steps=30, min_lr=3e-4,
                 weight_decay=0.1)
  return c
