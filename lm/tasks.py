"""Tasks: what a workload owns. The trainer owns everything else and branches on none of it.

A task gives the trainer
  data         `train_batch(step)`: this process's rows of the global batch, a dict of named
               numpy arrays; `eval_batches(split)` through the task's own `eval_batches`.
  model        a flax module, and `init(rng, batch) -> variables`.
  loss         `loss(params, model_state, batch, rng) -> (loss, aux)`, pure and jittable;
               aux = {'model_state': updated collections, 'metrics': {name: scalar}}.
  eval sums    `eval_sums(params, model_state, batch) -> {name: array}` that add up over
               batches (and devices), and `summarize(sums, split, prefix)` on the host, which
               turns them into metrics and writes the split's report files.
  bookkeeping  `steps()`, `unit`, `items_per_step`, `flops_per_step`, and the files a run's
               readers need (`write_files`: tokenizer, labels) and leave (`finish`: plots).

Batches are dicts of named arrays: 'tokens', 'targets' for language modelling; 'image',
'label', 'valid' (1 for a real example, 0 for eval padding) for image classification;
'tokens', 'token_mask' (True at real tokens), 'label', 'valid' for text classification.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import classification
from lm import losses
from lm import optim
from lm import workdir as workdir_lib
from lm.config import ConfigError


def build(config, workdir: str, *, training: bool = True, shapes_only: bool = False) -> 'Task':
  """The task `config.task` names. `training=False` builds it to evaluate a trained run;
  `shapes_only` (--dry_run) lets a task that can plan from the config and dataset metadata
  (lm/shapes.py) skip loading its data."""
  kinds = {'lm': LanguageModel, 'classify': ImageClassification,
           'classify_text': TextClassification}
  if config.task not in kinds:
    raise ConfigError(f'task={config.task!r} is unknown; use one of '
                      'lm, classify, classify_text')
  kind = kinds[config.task]
  if shapes_only and kind.plans_without_data:
    return kind(config, workdir, training=training, shapes_only=True)
  return kind(config, workdir, training=training)


def apply(model: nn.Module, params, model_state, args, *, train: bool, rng=None, **kwargs):
  """model.apply, returning (output, updated collections): mutable only while training."""
  variables = {'params': params, **model_state}
  rngs = {'dropout': rng} if rng is not None else {}
  if train and model_state:
    out, new_state = model.apply(variables, *args, train=True, rngs=rngs,
                                 mutable=list(model_state), **kwargs)
    return out, dict(new_state)
  return model.apply(variables, *args, train=train, rngs=rngs, **kwargs), model_state


class Task:
  """Shared bookkeeping; subclasses set data, model, unit and items_per_step."""

  unit = 'examples'
  write_reports = True  # False for a reader of a workdir it may not write (--mode=eval).
  plans_without_data = False  # True: takes shapes_only=True, with lm/shapes.py's data.

  def __init__(self, config, workdir: str, training: bool = True):
    self.config, self.workdir, self.training = config, workdir, training
    self.is_main = jax.process_index() == 0
    train = config.train
    self._penalty_mask = None
    for name in ('l1', 'l2', 'label_smoothing'):
      if not 0 <= train[name] < math.inf:
        raise ConfigError(f'train.{name}={train[name]} must be a finite number >= 0')

  # Overridden by every task.
  def init(self, rng, batch):
    raise NotImplementedError

  def loss(self, params, model_state, batch, rng, frozen=None):
    raise NotImplementedError

  def eval_sums(self, params, model_state, batch):
    raise NotImplementedError

  def summarize(self, sums: dict, split: str, prefix: str, *, training: bool) -> dict:
    raise NotImplementedError

  def eval_batches(self, split: str):
    return self.data.eval_batches(split)

  def describe(self) -> list[str]:
    """Lines for the start-up block: what data, how much of it."""
    return []

  def has_split(self, split: str) -> bool:
    """Whether the data has `split` (--mode=eval skips a test split another dir lacks)."""
    del split
    return True

  def example_batch(self) -> dict:
    """One example's worth of a training batch, for shapes."""
    return jax.tree.map(lambda x: x[:1], self.data.train_batch(0))

  def steps(self) -> int | None:
    """train.steps, or train.epochs of the data; None when the data's size is unknown (a plan)."""
    train = self.config.train
    if train.epochs > 0:
      if self.data.steps_per_epoch is None:
        return None
      return max(1, int(round(train.epochs * self.data.steps_per_epoch)))
    return train.steps

  def write_files(self, workdir: str) -> None:
    """Files a reader of the workdir needs besides checkpoints (tokenizer, labels)."""

  def finish(self, workdir: str) -> None:
    """After the last step (plots)."""

  def penalties(self, params) -> jax.Array:
    """train.l1 * sum |w| + train.l2 * 0.5 * sum w^2 over the weights weight decay acts on."""
    train = self.config.train
    if not (train.l1 or train.l2):
      return jnp.zeros((), jnp.float32)
    mask = optim.decay_mask(params)
    return (train.l1 * losses.l1_penalty(params, mask) +
            train.l2 * losses.l2_penalty(params, mask))

  def flops_per_step(self, variables, batch) -> float:
    """Training FLOPs per step: 3x the forward pass XLA counts (backward is about twice)."""
    forward = jax.jit(lambda v, b: self.forward(v, b))
    cost = forward.lower(variables, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_example = cost.get('flops', math.nan) / len(jax.tree.leaves(batch)[0])
    return 3 * per_example * self.config.train.batch_size

  def forward(self, variables, batch):
    """Inference output for a batch (used for FLOP counting)."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Language modelling.


class LanguageModel(Task):
  """Next-token prediction on a text corpus; reports bits per byte."""

  unit = 'tokens'
  plans_without_data = True

  def __init__(self, config, workdir: str, training: bool = True, shapes_only: bool = False):
    super().__init__(config, workdir, training)
    from lm import data, model, shapes  # pylint: disable=g-import-not-at-top
    # On resume the saved tokenizer wins, so ids mean the same thing as before the restart.
    tokenizer = (data.load_tokenizer(workdir)
                 if os.path.exists(os.path.join(workdir, 'tokenizer.json')) else None)
    self.data = (shapes.text(config, jax.process_count()) if shapes_only else
                 data.make_text_data(config, tokenizer, jax.process_index(), jax.process_count()))
    self.model_config = model.TransformerConfig.from_config(config.model, self.data.vocab_size)
    self.model = model.Transformer(self.model_config)
    self.items_per_step = self.data.tokens_per_batch

  def init(self, rng, batch):
    return self.model.init({'params': rng, 'dropout': rng}, jnp.zeros_like(batch['tokens']),
                           train=False)

  def forward(self, variables, batch):
    return self.model.apply(variables, batch['tokens'], train=False)

  def loss(self, params, model_state, batch, rng, frozen=None):
    del frozen
    logits_BxLxV, model_state = apply(self.model, params, model_state, (batch['tokens'],),
                                      train=True, rng=rng)
    loss = losses.mean(losses.cross_entropy(logits_BxLxV, batch['targets'],
                                            label_smoothing=self.config.train.label_smoothing))
    accuracy = (logits_BxLxV.argmax(-1) == batch['targets']).mean()
    return loss + self.penalties(params), {'model_state': model_state,
                                           'metrics': {'accuracy': accuracy}}

  def eval_sums(self, params, model_state, batch):
    logits_BxLxV, _ = apply(self.model, params, model_state, (batch['tokens'],), train=False)
    total, count = losses.cross_entropy(logits_BxLxV, batch['targets'])
    correct = (logits_BxLxV.argmax(-1) == batch['targets']).sum()
    return {'loss': total, 'correct': correct, 'count': count}

  def describe(self) -> list[str]:
    d, data = self.config.data, self.data
    lines = [f'{d.name} ({d.data_dir or "default data dir"}), {d.tokenizer} tokenizer, vocab '
             f'{data.vocab_size:,}']
    lines += [f'{name}: {len(split.tokens):,} tokens' for name, split in data.splits.items()]
    return lines + [f'{name}: {paths}' for name, paths in data.files.items()]

  def _text_split(self, split: str) -> str:
    test = self.config.data.test_split
    return 'test' if test and split == test else 'eval'

  def eval_batches(self, split: str):
    return self.data.eval_batches(self.config.train.eval_batches, self._text_split(split))

  def summarize(self, sums: dict, split: str, prefix: str, *, training: bool) -> dict:
    del training
    count = max(float(sums['count']), 1.0)
    loss = float(sums['loss']) / count
    out = {f'{prefix}/loss': loss, f'{prefix}/accuracy': float(sums['correct']) / count}
    bits = loss / math.log(2)
    text_split = self._text_split(split)
    out[f'{prefix}/bits_per_byte'] = bits / self.data.bytes_per_token(text_split)
    if self.config.data.tokenizer == 'char':
      out[f'{prefix}/bits_per_char'] = bits / self.data.chars_per_token(text_split)
    return out

  def example_batch(self) -> dict:
    return jax.tree.map(lambda x: x[:1], self.data.train_batch(0))

  def flops_per_step(self, variables, batch) -> float:
    """PaLM's 6N + 12LHQT per token (model.flops_per_token)."""
    del variables, batch
    from lm import model  # pylint: disable=g-import-not-at-top
    return model.flops_per_token(self.model_config) * self.items_per_step

  def write_files(self, workdir: str) -> None:
    from lm import data  # pylint: disable=g-import-not-at-top
    if not os.path.exists(os.path.join(workdir, 'tokenizer.json')):
      data.save_tokenizer(workdir, self.data.tokenizer)


# ---------------------------------------------------------------------------------------------
# Classification: the loss, sums and report every classifier shares.


def class_weights(spec: str, counts_K: np.ndarray) -> np.ndarray | None:
  """train.class_weights: '' (none), 'balanced' (N / (K * count), as scikit-learn) or 'w1,w2..'."""
  k = len(counts_K)
  if not spec:
    return None
  if spec == 'balanced':
    counts_K = np.asarray(counts_K, np.float64)
    if (counts_K == 0).any():
      raise ConfigError('train.class_weights=balanced but a class has no training example; '
                        'give explicit weights')
    return (counts_K.sum() / (k * counts_K)).astype(np.float32)
  try:
    weights = np.array([float(w) for w in spec.split(',')], np.float32)
  except ValueError:
    raise ConfigError(f"train.class_weights={spec!r} is not 'balanced' or a comma-separated "
                      'list of numbers') from None
  if len(weights) != k or not (np.isfinite(weights).all() and (weights >= 0).all()):
    raise ConfigError(f'train.class_weights={spec!r} needs {k} finite weights >= 0, one per '
                      'class')
  return weights


class Classification(Task):
  """Softmax classifiers: weighted cross-entropy or focal loss; accuracy, per-class F1,
  confusion matrix and, for two classes, ROC AUC, a PR curve and a tuned threshold."""

  def __init__(self, config, workdir: str, training: bool = True):
    super().__init__(config, workdir, training)
    t = config.train
    if t.loss not in ('cross_entropy', 'focal'):
      raise ConfigError(f'train.loss={t.loss!r} is unknown; use cross_entropy or focal')
    if t.loss == 'focal' and t.label_smoothing:
      raise ConfigError('train.label_smoothing applies to cross_entropy only; set it to 0 '
                        'with train.loss=focal')

  def _setup_classes(self, class_names, counts_K=None):
    """Called by subclasses once the data (and its class names) exist."""
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    if self.config.model.num_classes != self.num_classes:
      raise ConfigError(f'model.num_classes={self.config.model.num_classes} but the data has '
                        f'{self.num_classes} classes; set --config.model.num_classes='
                        f'{self.num_classes}')
    spec = self.config.train.class_weights
    if spec and counts_K is None:
      raise ConfigError('train.class_weights needs the class counts of the training data')
    weights = class_weights(spec, counts_K) if spec else None
    self.class_weights_K = None if weights is None else jnp.asarray(weights)
    self.positive = self._positive_index() if self.num_classes == 2 else None

  def _positive_index(self) -> int:
    name = self.config.data.positive_label
    if not name:
      return 1
    if name not in self.class_names:
      raise ConfigError(f'data.positive_label={name!r} is not a class ({", ".join(self.class_names)})')
    return self.class_names.index(name)

  # Subclasses: the model's logits [B, K] for a batch.
  def logits(self, params, model_state, batch, *, train: bool, rng=None):
    raise NotImplementedError

  def forward(self, variables, batch):
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return self.logits(params, model_state, batch, train=False)[0]

  def loss(self, params, model_state, batch, rng, frozen=None):
    del frozen
    logits_BxK, model_state = self.logits(params, model_state, batch, train=True, rng=rng)
    labels_B, weights_B = batch['label'], batch['valid']
    if self.class_weights_K is not None:
      weights_B = weights_B * self.class_weights_K[labels_B]
    t = self.config.train
    if t.loss == 'focal':
      loss = losses.mean(losses.focal(logits_BxK, labels_B, weights_B, t.focal_gamma))
    else:
      loss = losses.mean(losses.cross_entropy(logits_BxK, labels_B, weights_B,
                                              t.label_smoothing))
    valid_B = batch['valid']
    accuracy = ((logits_BxK.argmax(-1) == labels_B) * valid_B).sum() / jnp.maximum(
        valid_B.sum(), 1.0)
    return loss + self.penalties(params), {'model_state': model_state,
                                           'metrics': {'accuracy': accuracy}}

  def eval_sums(self, params, model_state, batch):
    logits_BxK, _ = self.logits(params, model_state, batch, train=False)
    labels_B, valid_B = batch['label'], batch['valid']
    preds_B = logits_BxK.argmax(-1)
    total, count = losses.cross_entropy(logits_BxK, labels_B, valid_B)
    sums = {'loss': total, 'count': count,
            'correct': ((preds_B == labels_B) * valid_B).sum(),
            'confusion': classification.confusion_matrix(preds_B, labels_B, valid_B,
                                                         self.num_classes)}
    if self.positive is not None:
      p_B = jax.nn.softmax(logits_BxK)[:, self.positive]
      sums['scores'] = classification.score_histogram(p_B, labels_B, valid_B, self.positive)
    return sums

  def _threshold_path(self) -> str:
    return os.path.join(self.workdir, 'threshold.json')

  def summarize(self, sums: dict, split: str, prefix: str, *, training: bool) -> dict:
    """Metrics of one split. For two classes, predictions use the decision threshold chosen
    on the eval split while training (saved in the workdir; 0.5 before there is one), except
    on that eval split itself, which reports at 0.5 and chooses the next threshold."""
    count = max(float(sums['count']), 1.0)
    out = {f'{prefix}/loss': float(sums['loss']) / count}
    confusion = np.asarray(sums['confusion'])
    if self.positive is not None:
      hist = sums['scores']
      choosing = training and prefix == 'eval'
      threshold = 0.5 if choosing else self.threshold()
      confusion = classification.binary_confusion(hist, threshold, self.positive).astype(int)
      out[f'{prefix}/roc_auc'] = classification.roc_auc(hist)
      out[f'{prefix}/threshold'] = threshold
      if choosing:
        best, best_f1 = classification.best_threshold(hist)
        out[f'{prefix}/best_threshold'], out[f'{prefix}/best_f1'] = best, best_f1
        if self.is_main and self.write_reports:
          workdir_lib.write_json(self._threshold_path(), {'threshold': best, 'f1': best_f1,
                                               'positive_label': self.class_names[self.positive]})
    report, table = classification.per_class_report(confusion, self.class_names)
    out[f'{prefix}/accuracy'] = report['accuracy']
    out.update({f'{prefix}/{k}': v for k, v in report.items() if k.startswith('macro')})
    if self.positive is not None:
      out[f'{prefix}/f1'] = report['per_class'][self.class_names[self.positive]]['f1']
    if self.is_main and self.write_reports:
      self._write_report(prefix, confusion, report, table, sums.get('scores'),
                         out.get(f'{prefix}/threshold'))
    return out

  def threshold(self) -> float:
    """The decision threshold chosen on the eval split while training, else 0.5."""
    path = self._threshold_path()
    if not os.path.exists(path):
      return 0.5
    with open(path) as f:
      return float(json.load(f)['threshold'])

  def _write_report(self, prefix, confusion, report, table, scores, threshold):
    # Whole files only: an --mode=eval of a live run may write the same names.
    w = self.workdir
    with workdir_lib.atomic_path(os.path.join(w, f'confusion_{prefix}.png')) as path:
      classification.save_confusion_png(confusion, self.class_names, path)
    workdir_lib.write_json(os.path.join(w, f'classes_{prefix}.json'),
                           {'confusion': np.asarray(confusion).tolist(), **report})
    workdir_lib.write_atomic(os.path.join(w, f'classes_{prefix}.md'), table + '\n')
    if scores is not None:
      with workdir_lib.atomic_path(os.path.join(w, f'pr_{prefix}.png')) as path:
        classification.save_pr_png(scores, path, threshold)

  def finish(self, workdir: str) -> None:
    if self.is_main:
      with workdir_lib.atomic_path(os.path.join(workdir, 'curves.png')) as path:
        classification.save_curves_png(os.path.join(workdir, 'metrics.jsonl'), path)


class ImageClassification(Classification):
  """Image classifiers of lm/cnn.py on TFDS image datasets or `<split>.npz` files."""

  unit = 'images'
  plans_without_data = True

  def __init__(self, config, workdir: str, training: bool = True, shapes_only: bool = False):
    super().__init__(config, workdir, training)
    from lm import cnn, images, shapes  # pylint: disable=g-import-not-at-top
    self.data = (shapes.images(config, jax.process_count()) if shapes_only else
                 images.make_image_data(config, jax.process_index(), jax.process_count()))
    self._setup_classes(self.data.class_names, self.data.class_counts)
    self.model = cnn.build(config.model)
    self.items_per_step = config.train.batch_size

  def init(self, rng, batch):
    return self.model.init({'params': rng, 'dropout': rng}, jnp.zeros_like(batch['image']),
                           train=False)

  def logits(self, params, model_state, batch, *, train: bool, rng=None):
    image = batch['image']
    if self.data.on_device:  # Stored pixels: augmented (training) and normalised here.
      image = self.data.prepare_on_device(image, jax.random.fold_in(rng, 1) if train else None)
    return apply(self.model, params, model_state, (image,), train=train, rng=rng)

  def describe(self) -> list[str]:
    d, data = self.config.data, self.data
    source = d.name or 'npz split files'
    return [f'{source} ({d.data_dir or "default data dir"}), {data.num_classes} classes, '
            f'images {"x".join(map(str, data.splits["train"].images_NxHxWxC.shape[1:]))}'] + [
                f'{name}: {len(split.labels_N):,} examples' for name, split in data.splits.items()]


class TextClassification(Classification):
  """A Transformer encoder (lm/model.py's Classifier) on labelled text (lm/labelled_text.py).

  The tokenizer, the label names and the train split's class counts are saved in the workdir
  and reused on resume, by `--mode=eval` and by `lm.predict`, so ids and class indices mean
  the same thing everywhere. Built to evaluate (`training=False`), it reads only the splits it
  evaluates, so `--mode=eval` runs on a dir that holds nothing but the eval split's file.
  """

  plans_without_data = True

  def __init__(self, config, workdir: str, training: bool = True, shapes_only: bool = False):
    super().__init__(config, workdir, training)
    from lm import data, labelled_text, model, shapes  # pylint: disable=g-import-not-at-top
    if os.path.exists(os.path.join(workdir, 'tokenizer.json')):
      tokenizer = data.load_tokenizer(workdir)
    elif config.init.workdir and not shapes_only:
      from lm import transfer  # pylint: disable=g-import-not-at-top
      tokenizer = transfer.source_tokenizer(config)  # Ids mean what they meant in pretraining.
    else:
      tokenizer = None
    labels = (labelled_text.load_labels(workdir)
              if os.path.exists(labelled_text.labels_path(workdir)) else None)
    # Runs from before train_counts.json was written evaluate by reading the train split.
    counts = (None if training or labels is None else
              labelled_text.load_train_counts(workdir, labels))
    if counts is not None and tokenizer is None:
      raise ConfigError(f'no tokenizer.json in {workdir!r} beside its labels.json; the run is '
                        'incomplete: retrain it')
    self.data = (shapes.labelled_text(config, jax.process_count()) if shapes_only else
                 labelled_text.make(config, tokenizer, labels, jax.process_index(),
                                    jax.process_count(), cls=config.model.pool == 'cls',
                                    train_counts=counts))
    self._setup_classes(self.data.class_names, self.data.class_counts)
    self.model = model.Classifier.from_config(config.model, self.data.vocab_size)
    if self.data.max_len > self.model.config.seq_len:
      raise ConfigError(f'data.max_len={self.data.max_len} exceeds model.seq_len='
                        f'{self.model.config.seq_len}; raise model.seq_len or lower data.max_len')
    self.items_per_step = config.train.batch_size

  def init(self, rng, batch):
    return self.model.init({'params': rng, 'dropout': rng}, jnp.zeros_like(batch['tokens']),
                           batch['token_mask'], train=False)

  def logits(self, params, model_state, batch, *, train: bool, rng=None):
    return apply(self.model, params, model_state, (batch['tokens'], batch['token_mask']),
                 train=train, rng=rng)

  def describe(self) -> list[str]:
    d, data = self.config.data, self.data
    counts = ', '.join(f'{n} {c:,}' for n, c in zip(data.class_names, data.class_counts))
    return [f'{d.name or "split files"} ({d.data_dir or "default data dir"}), {d.tokenizer} '
            f'tokenizer, vocab {data.vocab_size:,}, {data.max_len} tokens per text',
            f'classes (train): {counts}'] + [
                f'{name}: {len(split.labels_N):,} examples' for name, split in data.splits.items()]

  def example_batch(self) -> dict:
    return self.data.example_batch()

  def has_split(self, split: str) -> bool:
    return self.data.has_split(split)

  def flops_per_step(self, variables, batch) -> float:
    """6N per token plus attention, over the padded length (what the step computes)."""
    del variables, batch
    from lm import model  # pylint: disable=g-import-not-at-top
    return model.classifier_flops_per_example(
        self.model.config, self.num_classes, self.data.max_len) * self.items_per_step

  def write_files(self, workdir: str) -> None:
    from lm import data, labelled_text  # pylint: disable=g-import-not-at-top
    if not os.path.exists(os.path.join(workdir, 'tokenizer.json')):
      data.save_tokenizer(workdir, self.data.tokenizer)
    if not os.path.exists(labelled_text.labels_path(workdir)):
      labelled_text.save_labels(workdir, self.data.class_names)
    if not os.path.exists(labelled_text.train_counts_path(workdir)):
      labelled_text.save_train_counts(workdir, self.data.class_names, self.data.class_counts)
