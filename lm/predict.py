r"""Labels new texts with a trained text classifier.

  python -m lm.predict --workdir=/tmp/spam --text="WINNER! Claim your prize now" --text="see u at 8"
  python -m lm.predict --workdir=/tmp/spam --file=texts.txt     # one text per line

Prints a tab-separated header, then one line per text: the predicted label, its probability
and the text. For two classes the probability is the positive class's and the label is
positive when it reaches the decision threshold the run chose on its validation split
(`threshold.json`; 0.5 when the run saved none): the rule `--mode=eval` applies. For more
classes it is the likeliest label and its softmax probability.

Reads the run's `config.json`, `tokenizer.json`, `labels.json`, `threshold.json` and its latest
checkpoint, and writes nothing. Runs on one device; texts go through in batches of at most
`--batch_size`. Bad input (no checkpoint, a workdir of another task, no text) exits with code
2 and one line on stderr.

Shape key: N texts, B batch, L tokens (the run's data.max_len), K classes.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from lm import cli
from lm.config import ConfigError

_WORKDIR = cli.WORKDIR
_TEXT = flags.DEFINE_multi_string('text', [], 'A text to label; repeat for several.')
_FILE = flags.DEFINE_string('file', '', 'A UTF-8 file of texts, one per line; blank lines '
                            'are skipped.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Texts per forward pass.')


@dataclasses.dataclass(frozen=True)
class Prediction:
  label: str
  probability: float  # Two classes: of the positive class; else of `label`.
  text: str


class Predictor:
  """A trained text classifier restored from its workdir, on one device."""

  def __init__(self, workdir: str):
    # Imported here: `python -m lm.predict --help` should not wait for the model stack.
    from lm import checkpoint, data, labelled_text, model  # pylint: disable=g-import-not-at-top
    from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    config = checkpoint.load_config(workdir)
    if config.task != 'classify_text':
      raise ConfigError(f'{workdir!r} holds a {config.task!r} run, not a text classifier '
                        "(task 'classify_text'); pass the workdir of one")
    self.tokenizer = data.load_tokenizer(workdir)
    self.class_names = labelled_text.load_labels(workdir)
    self.max_len = config.data.max_len or config.model.seq_len
    self.cls = config.model.pool == 'cls'
    self.model = model.Classifier.from_config(
        config.model, tokenizer_lib.specials(self.tokenizer).vocab_size)
    self.positive, self.threshold = self._decision(workdir, config)
    _, params = checkpoint.restore_for_inference(workdir)
    self.params = jax.device_put(params, jax.devices()[0])
    self._forward = jax.jit(self._probabilities)

  def _decision(self, workdir: str, config) -> tuple[int | None, float]:
    """(positive class index, threshold) for two classes; (None, nan) otherwise."""
    if len(self.class_names) != 2:
      return None, float('nan')
    name = config.data.positive_label or self.class_names[1]
    threshold = 0.5
    path = os.path.join(workdir, 'threshold.json')
    if os.path.isfile(path):
      with open(path) as f:
        saved = json.load(f)
      name, threshold = saved.get('positive_label', name), float(saved['threshold'])
    if name not in self.class_names:
      raise ConfigError(f'positive label {name!r} is not one of the run\'s labels '
                        f'{self.class_names}; fix threshold.json or data.positive_label')
    return self.class_names.index(name), threshold

  def _probabilities(self, params, tokens_BxL, token_mask_BxL):
    logits_BxK = self.model.apply({'params': params}, tokens_BxL, token_mask_BxL, train=False)
    return jax.nn.softmax(logits_BxK)

  def probabilities(self, texts, batch_size: int = 256) -> np.ndarray:
    """float32 [N, K]: each text's class probabilities, in labels.json order."""
    from lm import labelled_text  # pylint: disable=g-import-not-at-top
    if batch_size <= 0:
      raise ConfigError(f'--batch_size={batch_size} must be positive')
    texts = list(texts)
    b = min(batch_size, len(texts))  # One shape for every batch: one compile.
    out = []
    for start in range(0, len(texts), b):
      chunk = texts[start:start + b]
      tokens_BxL, lengths_B = labelled_text.tokenize(chunk + [''] * (b - len(chunk)),
                                                     self.tokenizer, self.max_len, self.cls)
      mask_BxL = np.arange(self.max_len) < lengths_B[:, None]
      out.append(np.asarray(self._forward(self.params, tokens_BxL, mask_BxL))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

  def predict(self, texts, batch_size: int = 256) -> list[Prediction]:
    texts = list(texts)
    probs_NxK = self.probabilities(texts, batch_size)
    if self.positive is not None:
      p_N = probs_NxK[:, self.positive]
      negative = 1 - self.positive
      return [Prediction(self.class_names[self.positive if p >= self.threshold else negative],
                         float(p), text) for p, text in zip(p_N, texts)]
    best_N = probs_NxK.argmax(axis=1)
    return [Prediction(self.class_names[k], float(probs_NxK[i, k]), text)
            for i, (k, text) in enumerate(zip(best_N, texts))]

  def header(self) -> str:
    if self.positive is None:
      return 'label\tprobability\ttext'
    return (f'label\tp({self.class_names[self.positive]}) vs threshold '
            f'{self.threshold:.3f}\ttext')


def read_texts(texts, path: str) -> list[str]:
  """The --text values or the non-blank lines of --file (exactly one of the two)."""
  if bool(texts) == bool(path):
    raise ConfigError('give the texts with --text="..." (repeatable) or --file=<one text per '
                      'line>, not both or neither')
  if texts:
    if not all(t.strip() for t in texts):
      raise ConfigError('a --text is empty; give it some words')
    return list(texts)
  if not os.path.isfile(path):
    raise ConfigError(f'--file={path!r} does not exist; give a text file, one text per line')
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = [line.rstrip('\r\n') for line in f]
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path!r} is not UTF-8 ({e.reason}); save it as UTF-8') from e
  texts = [line for line in lines if line.strip()]
  if not texts:
    raise ConfigError(f'{path!r} has no text (empty or blank lines only); write one text per '
                      'line')
  return texts


def _one_line(text: str) -> str:
  return text.replace('\t', ' ').replace('\n', ' ')


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Keep orbax's restore chatter off the output.
  try:
    if not _WORKDIR.value:
      raise ConfigError('--workdir is required: the directory a text-classification run wrote')
    texts = read_texts(_TEXT.value, _FILE.value)
    predictor = Predictor(_WORKDIR.value)
    predictions = predictor.predict(texts, _BATCH_SIZE.value)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(predictor.header())
  for p in predictions:
    print(f'{p.label}\t{p.probability:.4f}\t{_one_line(p.text)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
