"""The base config: every field, its default and what it means, in one place.

Experiments (`experiments/<name>.py`) start from `get_config()` and override a few fields.
The returned ConfigDict is locked, so a mistyped override is an error rather than a no-op.
"""

import importlib.util
import json
import math
import os

import ml_collections


class ConfigError(ValueError):
  """Bad user input: `lm.main` prints it as one line and exits with code 2."""


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # Seeds init, dropout, data order and augmentation.
  c.task = 'lm'                   # 'lm' (next tokens), 'classify' (images), 'classify_text'.
  c.resume_mismatch = 'error'     # 'error' or 'ignore': resuming with a changed model/optimizer.

  c.data = ml_collections.ConfigDict()
  # TFDS name; 'files:<glob>' for your own text files (lm); '' for split files in data_dir:
  # <split>.npz (images), <split>.csv|.tsv|.jsonl (classify_text).
  c.data.name = 'tiny_shakespeare'
  c.data.data_dir = ''            # TFDS data dir; '' means TFDS's default (~/tensorflow_datasets).
  c.data.text_key = 'text'        # TFDS feature (labelled text: column or JSON key) of the text.
  c.data.train_split = 'train'    # Split to train on.
  c.data.eval_split = 'validation'  # Split `eval_every` and `--mode=eval` measure.
  c.data.test_split = ''          # Extra split evaluated at the end ('' = none).
  c.data.tokenizer = 'char'       # 'char', 'byte', 'word' or 'sentencepiece'.
  c.data.tokenizer_path = ''      # SentencePiece model file ('' = train one on the train split).
  c.data.heldout_files = 1        # files: the last N files (sorted) are the validation split.
  c.data.max_bytes = 0            # files: stop reading after this many bytes (0 = all).
  # Validation held out of train. classify: this fraction of the examples (0 = none). files:
  # the last fraction of the bytes (0 = 0.1 when the glob matches one file, else heldout_files).
  c.data.val_fraction = 0.0
  c.data.augment = True           # classify: random crop (4-pixel pad) and horizontal flip.
  c.data.cutout = 0               # classify: side of the cutout square (0 = off).
  c.data.max_examples = 0         # classify: read at most this many per split (0 = all).
  c.data.train_fraction = 1.0     # classify: train on this fixed random fraction of the labels.
  c.data.crop_padding = 'constant'  # classify: crop padding, 'constant' (zeros) or 'reflect'.
  c.data.eval_batch_size = 0      # classify: eval batch (0 = a multiple of batch_size >= 512).
  c.data.positive_label = ''      # Two classes: the positive one for F1 and thresholds ('' = 2nd).
  c.data.label_key = 'label'      # Labelled text: column, JSON key or TFDS feature of the label.
  c.data.max_len = 0              # Labelled text: tokens per example, [CLS] included (0 = seq_len).
  # word: the most frequent train words kept (+3 specials); sentencepiece without
  # tokenizer_path: the vocabulary size of the model trained on the train split.
  c.data.vocab_size = 20000
  c.data.oversample = False       # classify: draw examples with weight 1/(their class count).
  c.data.augment_on_device = False  # classify: crop/flip/cutout in the jitted step (uint8 batches).
  c.data.prefetch = -1            # Batches built ahead on a thread (-1: 2 on GPU/TPU, 0 on CPU).

  c.model = ml_collections.ConfigDict()
  c.model.name = 'transformer'    # 'transformer', or an image model from lm/cnn.py.
  c.model.num_layers = 4          # Transformer blocks.
  c.model.num_heads = 4           # Attention heads.
  c.model.d_model = 128           # Residual stream width.
  c.model.mlp_dim = 0             # MLP hidden width (0 = 4 * d_model).
  c.model.seq_len = 64            # Context length in tokens.
  c.model.vocab_size = 0          # 0 = take it from the tokenizer.
  c.model.pos = 'learned'         # 'learned' or 'rope' positions.
  c.model.norm = 'layernorm'      # 'layernorm' or 'rmsnorm' (pre-norm either way).
  c.model.mlp = 'gelu'            # 'gelu' or 'swiglu'.
  c.model.use_bias = False        # Biases in dense layers and norms.
  c.model.tie_embeddings = True   # Output projection shares the token embedding.
  c.model.dropout = 0.0           # Dropout on residual branches and embeddings.
  c.model.dtype = 'float32'       # Compute dtype ('bfloat16' on accelerators); params stay float32.
  c.model.remat = 'none'          # Recompute in backward: none, dots (keep weight matmuls) or full.
  c.model.attention = 'auto'      # auto (cuDNN on GPU in 16-bit, else einsum), cudnn, xla, einsum.
  c.model.scan_layers = False     # nn.scan over blocks: flat compile time; params stacked, blocks/.
  c.model.causal = True           # Causal attention; False: a bidirectional encoder (classifiers).
  c.model.pool = 'mean'           # Text classifier: mean, cls (first token) or last (last non-pad).
  c.model.head_dropout = 0.0      # Text classifier: dropout on the pooled features before the head.
  c.model.num_classes = 10        # classify: number of classes.
  c.model.width = 1.0             # classify: width multiplier where the model has one (0.5: half).
  c.model.hidden = (128, 64)      # classify, model.name=mlp: widths of the ReLU hidden layers.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 2000            # Optimizer steps.
  c.train.epochs = 0.0            # If > 0, sets `steps` from the train set size.
  c.train.batch_size = 12         # Global batch, across all devices and processes.
  c.train.grad_accum_steps = 1    # Micro-batches per step; batch_size is split between them.
  c.train.log_every = 100         # Steps between metric lines.
  c.train.eval_every = 500        # Steps between evaluations (0 = only at the end).
  c.train.eval_every_epochs = 0.0  # If > 0, evaluate every this many epochs instead.
  c.train.eval_batches = 20       # lm: batches per evaluation (classify: the whole split).
  c.train.checkpoint_every = 500  # Steps between checkpoints (always one at the end).
  c.train.keep_checkpoints = 3    # Checkpoints kept on disk.
  c.train.loss = 'cross_entropy'  # classify: 'cross_entropy' or 'focal'.
  c.train.focal_gamma = 2.0       # focal: the exponent of (1 - p).
  c.train.class_weights = ''      # classify: '' (none), 'balanced' or 'w0,w1,...' per class.
  c.train.label_smoothing = 0.0   # Cross-entropy label smoothing.
  c.train.l1 = 0.0                # L1 penalty on the weights weight decay acts on (a loss term).
  c.train.l2 = 0.0                # L2 penalty (0.5 * l2 * sum w^2) on the same weights.
  c.train.ema_decay = 0.0         # If > 0, keep an EMA of the params and evaluate it.
  c.train.on_nan = 'stop'         # 'stop' or 'rollback' when a loss or gradient is not finite.
  c.train.max_rollbacks = 3       # rollback: give up after this many.
  c.train.profile = False         # Write a jax.profiler trace of a few steps to the workdir.

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'          # 'adamw', 'sgd' (momentum), 'lion', 'adafactor' or 'adam'.
  c.optim.lr = 1e-3               # Peak learning rate.
  c.optim.schedule = 'cosine'     # 'cosine', 'constant', 'step' or 'onecycle'.
  c.optim.warmup_steps = 100      # Linear warmup from 0.
  c.optim.min_lr = 1e-4           # cosine: floor the decay ends at.
  c.optim.decay_steps = 0         # cosine: steps to reach the floor (0 = train.steps).
  c.optim.step_boundaries = (0.5, 0.75)  # step: fractions of train.steps where lr drops.
  c.optim.step_factor = 0.1       # step: multiplier at each boundary.
  c.optim.b1 = 0.9                # Adam/Lion beta1.
  c.optim.b2 = 0.99               # Adam/Lion beta2.
  c.optim.eps = 1e-8              # Adam epsilon.
  c.optim.momentum = 0.9          # sgd momentum.
  c.optim.nesterov = False        # sgd Nesterov momentum.
  c.optim.weight_decay = 0.1      # Decoupled weight decay (not on biases, norms, embeddings).
  c.optim.clip_norm = 1.0         # Global gradient-norm clip (0 = off).
  c.optim.freeze = ''             # Regex over parameter paths ('block_0/attn/qkv'): not trained.
  c.optim.unfreeze_at = 0         # > 0: the frozen parameters train from this step on.
  c.optim.lr_mults = ''           # 'regex=mult,...': those parameters' lr times mult (first wins).
  c.optim.layer_decay = 0.0       # Transformers: lr x decay^(depth from the top) per layer; 0 off.

  c.init = ml_collections.ConfigDict()  # Start from another run's weights (fine-tuning).
  c.init.workdir = ''             # A run dir (its latest checkpoint), or 'prefix=dir,...' per part.
  c.init.step = 0                 # That run's checkpoint at this step (0 = latest).
  c.init.skip = ''                # Comma-separated regexes of parameters not to load.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # Pure data parallelism (-1 = fill the remaining devices).
  c.mesh.fsdp = 1                 # Params and optimizer state sharded; batch split too.
  c.mesh.tensor = 1               # Megatron-style tensor parallelism over heads and MLP.
  # CPU-only hosts: XLA devices to split the host into when no mesh size is fixed. 0 = one per
  # core (when the batch divides): XLA:CPU then runs the shards side by side, ~1.5x faster than
  # one device spreading each small op over the cores. 1 = a single device.
  c.mesh.cpu_devices = 0

  c.lock()
  return c


# (field, lowest allowed, whether the lowest itself is allowed): checked before anything runs,
# so a bad value is one line at start, not a NaN at step 0 or a poisoned workdir.
_NUMBERS = (
    ('train.steps', 1, True), ('train.epochs', 0, True), ('train.batch_size', 1, True),
    ('train.grad_accum_steps', 1, True), ('train.log_every', 1, True),
    ('train.eval_every', 0, True), ('train.eval_every_epochs', 0, True),
    ('train.eval_batches', 1, True), ('train.checkpoint_every', 1, True),
    ('train.keep_checkpoints', 1, True), ('train.max_rollbacks', 0, True),
    ('train.ema_decay', 0, True), ('train.focal_gamma', 0, True),
    ('optim.lr', 0, False), ('optim.warmup_steps', 0, True), ('optim.min_lr', 0, True),
    ('optim.decay_steps', 0, True), ('optim.step_factor', 0, True), ('optim.b1', 0, True),
    ('optim.b2', 0, True), ('optim.eps', 0, True), ('optim.momentum', 0, True),
    ('optim.weight_decay', 0, True), ('optim.clip_norm', 0, True),
    ('optim.unfreeze_at', 0, True), ('init.step', 0, True),
)
_BELOW_ONE = ('train.ema_decay', 'optim.b1', 'optim.b2', 'optim.momentum')
_CHOICES = (('train.on_nan', ('stop', 'rollback')), ('resume_mismatch', ('error', 'ignore')))


def check_values(config) -> None:
  """Refuses values no run can use (a batch of 0, a NaN or negative learning rate, ...)."""
  for field, low, inclusive in _NUMBERS:
    section, name = field.split('.')
    value = config[section][name]
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if field in _BELOW_ONE:
      ok = ok and value < 1
    if not ok:
      bound = f'>= {low}' if inclusive else f'> {low}'
      if field in _BELOW_ONE:
        bound += ' and < 1'
      raise ConfigError(f'{field}={value} must be a finite number {bound}; fix --config.{field}')
  for field, choices in _CHOICES:
    value = config
    for part in field.split('.'):
      value = value[part]
    if value not in choices:
      raise ConfigError(f'{field}={value!r} must be one of {", ".join(choices)}')


def experiment_module(path: str):
  """Imports an experiment file anywhere on disk (its `get_config()`, maybe `sweep()`)."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist; pass --config=experiments/<name>.py')
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from an experiment file anywhere on disk."""
  config = experiment_module(path).get_config()
  config.lock()
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def cpu_device_count(config) -> int:
  """How many XLA devices this process's CPU is split into for this config.

  A fixed mesh gets its size shared between the processes (so it also runs on a laptop, and
  2 Slurm tasks with fsdp=2 make one device each, not two). A mesh left to fill (-1) gets one
  device per core when the batch divides, unless `mesh.cpu_devices` says otherwise; with
  several processes, each gets the product of the fixed axes (one device for a pure -1).
  """
  mesh, train = config.mesh, config.train
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  fixed = 1
  for s in sizes:
    fixed *= max(s, 1)
  processes = num_processes()
  if -1 not in sizes:
    if fixed % processes:
      raise ConfigError(
          f'mesh data*fsdp*tensor = {mesh.data}*{mesh.fsdp}*{mesh.tensor} = {fixed} devices do '
          f'not split evenly over {processes} processes; use a mesh whose size is a multiple '
          f'of {processes}, or -1 on one axis to fill the devices there are')
    return fixed // processes
  if processes > 1:
    return fixed
  if mesh.cpu_devices < 0:
    raise ConfigError(f'mesh.cpu_devices={mesh.cpu_devices} must be >= 0 (0 = one per core)')
  if mesh.cpu_devices:
    return mesh.cpu_devices
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  eval_batch = config.data.get('eval_batch_size', 0) or train.batch_size
  for n in range(max(cores, 1), 0, -1):
    shards = n // max(mesh.tensor, 1)  # Devices that split the batch.
    if (n % fixed == 0 and train.batch_size % (shards * train.grad_accum_steps) == 0
        and eval_batch % shards == 0):
      return n
  return fixed


def num_processes() -> int:
  """Processes this run has, from the environment of launch.local (LM_*) or of a Slurm step.

  Only a job step (what srun starts; it sets SLURM_STEP_NODELIST, which JAX's Slurm detection
  also needs) counts: a batch script, or a command it runs without srun, is one process even
  in a job of several tasks, though SLURM_NTASKS says otherwise there.
  """
  slurm = 1
  if 'SLURM_STEP_NODELIST' in os.environ:
    slurm = int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1')))
  return max(int(os.environ.get('LM_NUM_PROCESSES', '1')), slurm)


def split_cpu_devices(config):
  """Sets the CPU device count before JAX starts; an explicit XLA_FLAGS count wins.

  Only the CPU backend reads this flag, so accelerators are unaffected.
  """
  xla_flags = os.environ.get('XLA_FLAGS', '')
  count = cpu_device_count(config)
  if count > 1 and 'xla_force_host_platform_device_count' not in xla_flags:
    os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={count}'
