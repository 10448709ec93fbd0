"""Text classification end to end: experiment files, imbalance options, --mode=eval on new
data, and bad input through the command line."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import batches
from lm import config as config_lib
from lm import labelled_text
from lm import losses
from lm import predict
from lm import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_TEXT = os.path.join(HERE, 'tiny_text_config.py')
TEXT_EXPERIMENTS = ('sms_spam', 'ag_news', 'sst2')


def lm_main(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'lm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _experiment(name):
  return config_lib.load(os.path.join(ROOT, 'experiments', f'{name}.py'))


# --- experiment files ------------------------------------------------------------------------


@pytest.mark.parametrize('name', TEXT_EXPERIMENTS)
def test_text_experiments_build_the_worked_example(name):
  from lm import model  # pylint: disable=g-import-not-at-top
  c = _experiment(name)
  assert c.task == 'classify_text' and not c.model.causal and c.model.pool == 'mean'
  assert (c.optim.name, c.optim.lr, c.train.batch_size) == ('adam', 1e-3, 32)
  assert c.train.loss == 'cross_entropy' and c.train.eval_every_epochs == 1
  assert c.data.test_split or c.data.eval_split == 'validation'
  net = model.Classifier.from_config(c.model, vocab_size=c.data.vocab_size + 3)
  tokens = jnp.zeros((2, c.data.max_len), jnp.int32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), tokens, tokens > 0))
  logits = jax.eval_shape(lambda v: net.apply(v, tokens, tokens > 0), variables)
  assert logits.shape == (2, c.model.num_classes)


def test_mnist_mlp_is_784_512_256_10_and_the_cifar_mlp_keeps_128_64():
  from lm import cnn  # pylint: disable=g-import-not-at-top

  def kernels(name, image_shape):
    c = _experiment(name)
    net = cnn.build(c.model)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                             train=False))['params']
    return [p['kernel'].value.shape for p in params.values()]

  assert kernels('mnist_mlp', (28, 28, 1)) == [(784, 512), (512, 256), (256, 10)]
  assert kernels('cifar10_mlp', (32, 32, 3)) == [(3072, 128), (128, 64), (64, 10)]


@pytest.mark.parametrize('hidden', [(), (512, 0)])
def test_mlp_hidden_widths_must_be_positive(hidden):
  from lm import cnn  # pylint: disable=g-import-not-at-top
  c = _experiment('mnist_mlp')
  c.model.hidden = hidden
  with pytest.raises(config_lib.ConfigError, match='model.hidden'):
    cnn.build(c.model)


def test_hidden_widths_on_a_model_without_them_is_an_error():
  from lm import cnn  # pylint: disable=g-import-not-at-top
  c = _experiment('cifar10_resnet20')
  c.model.hidden = (512, 256)
  with pytest.raises(config_lib.ConfigError, match='no hidden-width list'):
    cnn.build(c.model)


# --- imbalance on SMS spam (13% spam) --------------------------------------------------------


def _tiny(**train_fields):
  c = config_lib.load(TINY_TEXT)
  c.train.update(steps=30, eval_every=0, checkpoint_every=30, **train_fields)
  return c


def _val_texts(c):
  examples = labelled_text.read_split(c.data, 'train')
  _, val_rows = batches.hold_out(len(examples.texts), c.data.val_fraction)
  return [examples.texts[i] for i in val_rows]


@pytest.fixture(scope='module')
def imbalance_runs(tmp_path_factory):
  """Each option trained 30 steps on SMS spam: {name: (final metrics, mean log-odds of spam
  over the validation texts)}."""
  options = {'none': {}, 'balanced': {'class_weights': 'balanced'},
             'weights': {'class_weights': '1,6.5'}, 'oversample': 'oversample',
             'focal': {'loss': 'focal', 'focal_gamma': 2.0}}
  out = {}
  for name, fields in options.items():
    c = _tiny(**(fields if isinstance(fields, dict) else {}))
    c.data.oversample = fields == 'oversample'
    workdir = str(tmp_path_factory.mktemp(name))
    final = train.Trainer(c, workdir).run()
    probs_Nx2 = predict.Predictor(workdir).probabilities(_val_texts(c))
    out[name] = final, float(np.mean(np.log(probs_Nx2[:, 1]) - np.log(probs_Nx2[:, 0])))
  return out


@pytest.mark.parametrize('name', ['none', 'balanced', 'weights', 'oversample', 'focal'])
def test_each_imbalance_option_trains_and_reports_spam_f1(imbalance_runs, name):
  final, _ = imbalance_runs[name]
  for key in ('eval/f1', 'eval/roc_auc', 'test/f1', 'test/accuracy', 'test/macro_f1'):
    assert np.isfinite(final[key]), key
  assert final['test/roc_auc'] > 0.8  # 30 steps already rank most spam above most ham.


@pytest.mark.parametrize('name', ['balanced', 'weights', 'oversample'])
def test_reweighting_raises_the_odds_of_spam(imbalance_runs, name):
  # Unweighted, the model learns spam's 13% prior; weighting the classes equally (or drawing
  # them equally) moves every text's log-odds of spam up: by log 6.5 at convergence, by 0.37
  # to 0.47 after these 30 steps.
  log_odds = {k: v[1] for k, v in imbalance_runs.items()}
  assert log_odds[name] > log_odds['none'] + 0.25, log_odds


def test_balanced_weights_are_n_over_k_times_count(tmp_path):
  from lm import tasks  # pylint: disable=g-import-not-at-top
  c = _tiny(class_weights='balanced')
  task = tasks.build(c, str(tmp_path))
  counts = task.data.class_counts
  np.testing.assert_allclose(task.class_weights_K, counts.sum() / (2 * counts), rtol=1e-6)
  # ham, spam in the 3,673 of 4,081 train rows not held out (545 spam in all, 46 held out).
  assert counts.tolist() == [3174, 499]


def test_focal_loss_is_below_cross_entropy_and_equal_at_gamma_0():
  logits = jax.random.normal(jax.random.key(0), (64, 2)) * 3
  labels = jax.random.randint(jax.random.key(1), (64,), 0, 2)
  ce = losses.mean(losses.cross_entropy(logits, labels))
  assert losses.mean(losses.focal(logits, labels, gamma=2.0)) < ce
  np.testing.assert_allclose(losses.mean(losses.focal(logits, labels, gamma=0.0)), ce,
                             rtol=1e-5)


def test_oversampled_batches_are_about_half_spam():
  c = _tiny()
  c.data.oversample = True
  data = labelled_text.make(c)
  labels = np.concatenate([data.train_batch(s)['label'] for s in range(200)])
  assert 0.45 < labels.mean() < 0.55


# --- --mode=eval on new data -----------------------------------------------------------------


def _write_csv(path, rows, header=('text', 'label')):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


@pytest.fixture(scope='module')
def spam_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('spam') / 'run'
  result = lm_main(f'--config={TINY_TEXT}', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_task_built_to_evaluate_reads_only_the_eval_split(spam_run, tmp_path):
  from lm import tasks  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'other'
  other.mkdir()
  _write_csv(other / 'new.csv', [('free prize, call now', 'spam'), ('see you soon', 'ham')] * 3)
  c = config_lib.load(TINY_TEXT)
  c.data.update(data_dir=str(other), eval_split='new')
  task = tasks.build(c, str(spam_run), training=False)  # No train.csv there: not read.
  assert task.data.class_counts.tolist() == [3174, 499]  # From train_counts.json.
  assert task.has_split('new') and not task.has_split('test')
  (batch,) = task.eval_batches('new')
  assert batch['valid'].sum() == 6 and batch['label'][:2].tolist() == [1, 0]
  assert task.example_batch()['tokens'].shape == (1, c.data.max_len)
  with pytest.raises(config_lib.ConfigError, match='no train split'):
    task.data.train_batch(0)
  # A held-out validation split is the same rows, tokenized the same, as in training.
  c = config_lib.load(TINY_TEXT)
  held_out = tasks.build(c, str(spam_run), training=False).data.split('validation')
  trained = labelled_text.make(c).splits['validation']
  np.testing.assert_array_equal(held_out.tokens_NxL, trained.tokens_NxL)
  np.testing.assert_array_equal(held_out.labels_N, trained.labels_N)


def test_eval_on_another_dir_appends_accuracy_and_f1_at_the_saved_threshold(spam_run, tmp_path):
  other = tmp_path / 'other'
  other.mkdir()
  test = labelled_text.read_split(config_lib.load(TINY_TEXT).data, 'test')
  rows = list(zip(test.texts, test.labels))[:200]
  _write_csv(other / 'new.csv', rows)
  before = (spam_run / 'metrics.jsonl').read_text().splitlines()
  result = lm_main('--mode=eval', f'--config={TINY_TEXT}', f'--workdir={spam_run}',
                   f'--config.data.data_dir={other}', '--config.data.eval_split=new')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (spam_run / 'metrics.jsonl').read_text().splitlines()
  assert lines[:-1] == before
  record = json.loads(lines[-1])
  # What lm.predict says of the same rows, at the same saved threshold.
  predictor = predict.Predictor(str(spam_run))
  labels = np.array([p.label for p in predictor.predict([t for t, _ in rows])])
  truth = np.array([l for _, l in rows])
  tp = np.sum((labels == 'spam') & (truth == 'spam'))
  threshold = json.loads((spam_run / 'threshold.json').read_text())['threshold']
  assert record['eval/threshold'] == threshold
  assert record['eval/accuracy'] == pytest.approx(np.mean(labels == truth), abs=1e-9)
  assert record['eval/f1'] == pytest.approx(
      2 * tp / (np.sum(labels == 'spam') + np.sum(truth == 'spam')), abs=1e-9)
  assert 'eval/macro_f1' in record and record['eval/data_dir'] == str(other)
  assert not any(k.startswith('test/') for k in record)  # The other dir has no test split.


# --- bad input through the command line ------------------------------------------------------


def _good_rows(n=64):
  return [(f'hello friend number {i}' if i % 4 else f'win cash prize now {i}',
           'ham' if i % 4 else 'spam') for i in range(n)]


@pytest.mark.parametrize('case, needles', [
    ('missing_split', ["no validation.csv", 'it has: test.csv, train.csv',
                       '--config.data.eval_split']),
    ('missing_text_column', ["train.csv' line 1 (the header) has no 'text'", 'message, label',
                             '--config.data.text_key']),
    ('missing_label_column', ["validation.csv' line 1 (the header) has no 'label'",
                              '--config.data.label_key']),
    ('empty_file', ["validation.csv' is empty", 'header row']),
    ('label_only_at_eval', ["validation.csv' line 3", "label 'eggs'", 'retrain with it']),
    ('unparsable_row', ["train.csv' line 4", '3 fields but the header has 2', 'quote fields']),
])
def test_bad_data_is_one_line_naming_file_line_and_fix(tmp_path, case, needles):
  data = tmp_path / 'data'
  data.mkdir()
  _write_csv(data / 'train.csv', _good_rows())
  _write_csv(data / 'validation.csv', _good_rows(16))
  _write_csv(data / 'test.csv', _good_rows(16))
  if case == 'missing_split':
    os.remove(data / 'validation.csv')
  elif case == 'missing_text_column':
    _write_csv(data / 'train.csv', _good_rows(), header=('message', 'label'))
  elif case == 'missing_label_column':
    _write_csv(data / 'validation.csv', _good_rows(16), header=('text', 'class'))
  elif case == 'empty_file':
    (data / 'validation.csv').write_text('')
  elif case == 'label_only_at_eval':
    _write_csv(data / 'validation.csv', [('a', 'ham'), ('green eggs', 'eggs'), ('b', 'spam')])
  elif case == 'unparsable_row':
    (data / 'train.csv').write_text('text,label\nhi,ham\nwin,spam\nhello, friend,ham\n')
  workdir = tmp_path / 'run'
  result = lm_main(f'--config={TINY_TEXT}', f'--workdir={workdir}',
                   f'--config.data.data_dir={data}', '--config.data.val_fraction=0',
                   '--config.train.batch_size=2')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert not workdir.exists()
