"""lm/tasks.py: the classification loss with class weights, and evaluation sums that leave
out the padding rows, against numpy computations over the unpadded examples."""

import os

import jax
import numpy as np
import pytest

from lm import config as config_lib
from lm import tasks
from lm import train

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_cnn(**overrides):
  """tests/tiny_cnn_config.py (simple_cnn, 256 CIFAR-10 examples a split), unaugmented."""
  c = config_lib.load(os.path.join(HERE, 'tiny_cnn_config.py'))
  c.data.augment = False
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_balanced_class_weights_are_n_over_k_times_the_count():
  np.testing.assert_allclose(tasks.class_weights('balanced', np.array([6, 2, 4])),
                             [12 / 18, 12 / 6, 12 / 12], rtol=1e-6)
  np.testing.assert_array_equal(tasks.class_weights('1,0.5,2', np.array([1, 1, 1])), [1, 0.5, 2])
  assert tasks.class_weights('', np.array([1, 1])) is None


@pytest.mark.parametrize('loss_name', ['cross_entropy', 'focal'])
def test_classification_loss_weighs_each_example_by_its_class_weight(tmp_path, loss_name):
  """sum_i w[y_i] l_i / sum_i w[y_i], as Flax lm1b's weighted cross-entropy; l_i is the
  cross-entropy or, with train.loss=focal, -(1 - p)^gamma log p of the label."""
  weights_K = np.arange(1.0, 11.0)  # Class k weighs k + 1: every class counts differently.
  config = tiny_cnn(**{'train.class_weights': ','.join(map(str, weights_K)),
                       'train.loss': loss_name, 'train.focal_gamma': 2.0})
  task = tasks.build(config, str(tmp_path))
  batch = task.data.train_batch(0)
  assert len(set(batch['label'].tolist())) > 1  # Else the weights cancel out.
  params = task.init(jax.random.key(0), batch)['params']
  loss, _ = jax.jit(task.loss)(params, {}, batch, jax.random.key(1))
  logits = jax.jit(task.forward)({'params': params}, batch)
  log_p = np.take_along_axis(_log_softmax(logits), batch['label'][:, None], -1)[:, 0]
  per_example = {'cross_entropy': -log_p, 'focal': -(1 - np.exp(log_p)) ** 2 * log_p}
  w = weights_K[batch['label']]
  weighted = {name: (w * l).sum() / w.sum() for name, l in per_example.items()}
  np.testing.assert_allclose(loss, weighted[loss_name], rtol=1e-5)
  assert abs(float(loss) - per_example[loss_name].mean()) > 1e-3  # Unweighted would differ.
  other = 'focal' if loss_name == 'cross_entropy' else 'cross_entropy'
  assert abs(float(loss) - weighted[other]) > 1e-3  # And so would the other loss.


def test_padded_eval_rows_are_left_out_of_loss_accuracy_and_confusion(tmp_path):
  """256 test examples in eval batches of 24 (8 devices): the last batch has 8 padding rows.
  The split's totals equal a numpy computation over the 256 examples alone."""
  config = tiny_cnn(**{'data.eval_batch_size': 24})
  trainer = train.Trainer(config, str(tmp_path))
  state = trainer.initial_state()
  totals = {}
  summarize = trainer.task.summarize
  trainer.task.summarize = lambda sums, *a, **k: totals.update(sums) or summarize(sums, *a, **k)
  result = trainer.evaluate(state, 'test')

  batches = trainer.task.eval_batches('test')
  assert len(batches) == 11 and batches[-1]['valid'].sum() == 256 - 10 * 24
  valid = np.concatenate([b['valid'] for b in batches]).astype(bool)
  images = np.concatenate([b['image'] for b in batches])[valid]
  labels = np.concatenate([b['label'] for b in batches])[valid]
  logits = np.asarray(jax.jit(trainer.task.forward)(
      {'params': jax.device_get(state.params)}, {'image': images}))
  ce = -np.take_along_axis(_log_softmax(logits), labels[:, None], -1)[:, 0]
  preds = logits.argmax(-1)
  confusion = np.zeros((10, 10), int)
  np.add.at(confusion, (labels, preds), 1)

  assert float(totals['count']) == 256
  np.testing.assert_allclose(totals['loss'], ce.sum(), rtol=1e-5)
  assert int(totals['correct']) == (preds == labels).sum()
  np.testing.assert_array_equal(totals['confusion'], confusion)
  np.testing.assert_allclose(result['eval/loss'], ce.mean(), rtol=1e-5)
  assert result['eval/accuracy'] == (preds == labels).mean()
