"""Confusion matrix, per-class report and plots on hand-checked examples."""

import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from lm import classification

NAMES = ('cat', 'dog', 'bird')
# True classes down, predictions across: cat 3/4 right, dog 1/2, bird never predicted.
CONFUSION = np.array([[3, 1, 0],
                      [1, 1, 0],
                      [2, 0, 0]])


def test_confusion_matrix_counts_only_unmasked_rows():
  targets = jnp.array([0, 0, 0, 0, 1, 1, 2, 2, 1, 2])
  preds = jnp.array([0, 0, 0, 1, 0, 1, 0, 0, 2, 1])
  mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)  # Padding rows last.
  got = jax.jit(classification.confusion_matrix, static_argnums=3)(preds, targets, mask, 3)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, CONFUSION)


def test_confusion_matrix_of_a_sharded_batch_matches_unsharded():
  rng = np.random.default_rng(0)
  preds, targets = rng.integers(0, 10, 64), rng.integers(0, 10, 64)
  mask = (np.arange(64) < 50).astype(np.float32)
  expected = np.zeros((10, 10), int)
  np.add.at(expected, (targets[:50], preds[:50]), 1)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put((preds, targets, mask), NamedSharding(mesh, P('data')))
  got = jax.jit(classification.confusion_matrix, static_argnums=3)(*sharded, 10)
  np.testing.assert_array_equal(got, expected)


def test_per_class_report_math():
  report, table = classification.per_class_report(CONFUSION, NAMES)
  cat, dog, bird = (report['per_class'][n] for n in NAMES)
  assert cat['precision'] == pytest.approx(3 / 6) and cat['recall'] == pytest.approx(3 / 4)
  assert cat['f1'] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
  assert dog['precision'] == pytest.approx(1 / 2) and dog['recall'] == pytest.approx(1 / 2)
  assert (bird['precision'], bird['recall'], bird['f1'], bird['support']) == (0, 0, 0, 2)
  assert report['accuracy'] == pytest.approx(4 / 8)
  assert report['macro_recall'] == pytest.approx((0.75 + 0.5 + 0) / 3)
  assert report['macro_f1'] == pytest.approx((0.6 + 0.5 + 0) / 3)
  assert '| cat | 0.5000 | 0.7500 | 0.6000 | 4 |' in table
  assert table.count('\n') == 2 + len(NAMES)


def test_macro_averages_skip_classes_neither_present_nor_predicted():
  # A fourth class the split lacks and the model never predicts: the three classes' averages
  # stand (scikit-learn's f1_score(average='macro') scores the labels it sees). A class
  # present but never predicted (bird) still counts as 0.
  confusion = np.zeros((4, 4), int)
  confusion[:3, :3] = CONFUSION
  report, _ = classification.per_class_report(confusion, NAMES + ('fish',))
  assert report['macro_f1'] == pytest.approx((0.6 + 0.5 + 0) / 3)
  assert report['macro_recall'] == pytest.approx((0.75 + 0.5 + 0) / 3)
  assert report['per_class']['fish'] == {'precision': 0, 'recall': 0, 'f1': 0, 'support': 0}


def test_pngs_are_written(tmp_path):
  confusion_png = tmp_path / 'confusion.png'
  classification.save_confusion_png(CONFUSION, NAMES, str(confusion_png))
  metrics = tmp_path / 'metrics.jsonl'
  lines = [{'step': s, 'loss': 2.0 / s} for s in range(1, 6)]
  lines += [{'step': 5, 'eval/loss': 0.9, 'eval/accuracy': 0.7}, {'step': 5, 'lr': 0.1}]
  metrics.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  curves_png = tmp_path / 'curves.png'
  classification.save_curves_png(str(metrics), str(curves_png))
  for path in (confusion_png, curves_png):
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and os.path.getsize(path) > 5000


def test_curves_skip_a_torn_line(tmp_path, capsys):
  """A kill mid-write left a torn line; the end-of-run plot must not fail the run for it."""
  metrics = tmp_path / 'metrics.jsonl'
  metrics.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo{"step": 3, '
                     '"train/loss": 1.0}\n{"step": 4, "train/loss": 0.5, "train/accuracy": 0.9}\n'
                     '{"step": 5, "eval/acc')
  curves_png = tmp_path / 'curves.png'
  classification.save_curves_png(str(metrics), str(curves_png))
  assert curves_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert capsys.readouterr().err.count('skipping a line that is not a JSON object') == 2
