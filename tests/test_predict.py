"""lm.predict: labels from a trained text classifier agree with the run's own evaluation."""

import csv
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from lm import labelled_text
from lm import predict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_TEXT = os.path.join(HERE, 'tiny_text_config.py')


def _run(module, *args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _train(workdir, *overrides):
  result = _run('lm.main', f'--config={TINY_TEXT}', f'--workdir={workdir}', *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def spam_run(tmp_path_factory):
  """The tiny config trained on SMS spam (binary, positive label 'spam')."""
  return str(_train(tmp_path_factory.mktemp('spam') / 'run'))


@pytest.fixture(scope='module')
def topics_run(tmp_path_factory):
  """Three classes, each marked by a keyword among random filler words."""
  data = tmp_path_factory.mktemp('topics')
  rng = np.random.default_rng(0)
  filler = [f'w{i}' for i in range(40)]
  for split, n in (('train', 240), ('validation', 60)):
    with open(data / f'{split}.csv', 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['text', 'label'])
      for i in range(n):
        label = ('alpha', 'beta', 'gamma')[i % 3]
        words = list(rng.choice(filler, 6)) + [label]
        rng.shuffle(words)
        writer.writerow([' '.join(words), label])
  return str(_train(tmp_path_factory.mktemp('topics') / 'run', f'--config.data.data_dir={data}',
                    '--config.data.val_fraction=0', '--config.data.test_split=',
                    '--config.data.positive_label=', '--config.model.num_classes=3',
                    '--config.train.steps=60'))


def test_binary_labels_reproduce_the_runs_test_metrics(spam_run):
  # The test split was evaluated at the end of training with threshold.json's threshold:
  # predicting each text with the same threshold must give the same accuracy and spam F1.
  config = json.load(open(os.path.join(spam_run, 'config.json')))
  examples = labelled_text.read_split(
      ml_collections.ConfigDict(config['data']), 'test')
  predictor = predict.Predictor(spam_run)
  probs_NxK = predictor.probabilities(examples.texts, batch_size=128)
  np.testing.assert_allclose(probs_NxK.sum(axis=1), 1.0, rtol=1e-5)
  labels = [p.label for p in predictor.predict(examples.texts, batch_size=128)]
  truth = np.array(examples.labels)
  pred = np.array(labels)
  tp = np.sum((pred == 'spam') & (truth == 'spam'))
  f1 = 2 * tp / (np.sum(pred == 'spam') + np.sum(truth == 'spam'))
  final = [m for m in _metrics(spam_run) if 'test/accuracy' in m][-1]
  threshold = json.load(open(os.path.join(spam_run, 'threshold.json')))['threshold']
  assert predictor.threshold == threshold == final['test/threshold']
  assert np.mean(pred == truth) == pytest.approx(final['test/accuracy'], abs=1e-9)
  assert f1 == pytest.approx(final['test/f1'], abs=1e-9)
  # A batch size that pads the last batch differently changes nothing.
  np.testing.assert_allclose(predictor.probabilities(examples.texts, batch_size=100), probs_NxK,
                             atol=1e-6)


def test_multiclass_labels_reproduce_the_runs_eval_accuracy(topics_run):
  examples = labelled_text.read_split(
      ml_collections.ConfigDict(
          json.load(open(os.path.join(topics_run, 'config.json')))['data']), 'validation')
  predictor = predict.Predictor(topics_run)
  assert predictor.positive is None and predictor.class_names == ('alpha', 'beta', 'gamma')
  predictions = predictor.predict(examples.texts)
  probs_NxK = predictor.probabilities(examples.texts)
  assert [p.probability for p in predictions] == pytest.approx(probs_NxK.max(axis=1).tolist())
  accuracy = np.mean([p.label == t for p, t in zip(predictions, examples.labels)])
  final = [m for m in _metrics(topics_run) if 'eval/accuracy' in m][-1]
  assert accuracy == pytest.approx(final['eval/accuracy'], abs=1e-9)
  assert accuracy > 0.9  # The keyword decides the class; a broken model would not find it.


def test_cli_prints_a_header_and_one_line_per_text(spam_run, tmp_path):
  texts = ['WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now',
           'ok see you at home later']
  result = _run('lm.predict', f'--workdir={spam_run}', f'--text={texts[0]}', f'--text={texts[1]}')
  assert result.returncode == 0, result.stderr
  header, *lines = result.stdout.strip().splitlines()
  threshold = json.load(open(os.path.join(spam_run, 'threshold.json')))['threshold']
  assert header == f'label\tp(spam) vs threshold {threshold:.3f}\ttext'
  expected = predict.Predictor(spam_run).predict(texts)
  assert len(lines) == 2
  for line, want in zip(lines, expected):
    label, p, text = line.split('\t')
    assert (label, text) == (want.label, want.text)
    assert float(p) == pytest.approx(want.probability, abs=1e-4)
    assert (label == 'spam') == (float(p) >= threshold)
  # --file: one text per line, blank lines skipped.
  path = tmp_path / 'texts.txt'
  path.write_text(f'{texts[0]}\n\n{texts[1]}\n', encoding='utf-8')
  from_file = _run('lm.predict', f'--workdir={spam_run}', f'--file={path}')
  assert from_file.returncode == 0, from_file.stderr
  assert from_file.stdout == result.stdout


def _lm_workdir(tmp_path):
  workdir = tmp_path / 'lm_run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'task': 'lm'}))
  return workdir


@pytest.mark.parametrize('case, needle', [
    ('no_checkpoint', 'no checkpoint'),
    ('no_workdir', 'no config.json'),
    ('other_task', "holds a 'lm' run"),
    ('empty_file', 'has no text'),
    ('no_text', 'give the texts'),
    ('empty_text', 'is empty'),
])
def test_bad_input_is_one_line_and_exit_2(spam_run, tmp_path, case, needle):
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  for name in ('config.json', 'tokenizer.json', 'labels.json'):
    (untrained / name).write_bytes(open(os.path.join(spam_run, name), 'rb').read())
  args = {
      'no_checkpoint': [f'--workdir={untrained}', '--text=hi'],
      'no_workdir': [f'--workdir={tmp_path / "nowhere"}', '--text=hi'],
      'other_task': [f'--workdir={_lm_workdir(tmp_path)}', '--text=hi'],
      'empty_file': [f'--workdir={spam_run}', f'--file={empty}'],
      'no_text': [f'--workdir={spam_run}'],
      'empty_text': [f'--workdir={spam_run}', '--text= '],
  }[case]
  result = _run('lm.predict', *args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], result.stderr
  assert result.stdout == ''


def test_a_mistyped_flag_is_one_error_line_and_exit_2():
  result = _run('lm.predict', '--workdirr=/tmp/x', '--text=hi')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().startswith("error: Unknown command line flag 'workdirr'")
  assert len(result.stderr.strip().splitlines()) == 1
