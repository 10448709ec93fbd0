#!/usr/bin/env python3
"""Our text (and MNIST) classifiers against classical baselines, on the same splits.

For each dataset it trains our experiment from scratch through the real entry point
(`python -m lm.main --config=experiments/<name>.py`, a fresh workdir, wall time measured
around the whole command: start-up, tokenizing, compiling, training, evaluating, saving), then
fits the scikit-learn baselines on the same training rows (the experiment's train split less
the validation rows it holds out) and scores them on the same test split:

  sms_spam  spam F1 on test     char 1-5-gram TF-IDF + logistic regression; word-count naive Bayes
  ag_news   accuracy on test    word 1-2-gram TF-IDF + logistic regression
  sst2      accuracy on GLUE dev  word 1-2-gram TF-IDF + logistic regression
  mnist     accuracy on test    scikit-learn MLPClassifier 512-256, Adam

It prints a markdown table and appends it, with the command, the machine (lscpu model and
cores), the date, the versions and the load average before and after each run, to --output:

  .venv/bin/python benchmarks/text_classification.py --output=docs/TEXT_CLASSIFICATION.md

scikit-learn is the benchmark's own dependency (`pip install scikit-learn`), not the
project's. Wall times mean something only on a quiet machine: rows whose 1-minute load
average exceeded the core count are marked "under load".
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's `lm`, not whichever one the venv has installed.
sys.path.insert(0, REPO_ROOT)
SHARED = os.path.join(os.path.dirname(REPO_ROOT), 'shared')

# name: (experiment, data dir under shared/, metric key, what it measures, target, time limit s)
DATASETS = {
    'sms_spam': ('sms_spam', 'text/sms_spam', 'test/f1', 'test spam F1', 0.95, 300),
    'ag_news': ('ag_news', 'text/ag_news', 'test/accuracy', 'test accuracy', 0.88, 600),
    'sst2': ('sst2', 'text/sst2', 'eval/accuracy', 'GLUE dev accuracy', 0.83, 900),
    'mnist': ('mnist_mlp', 'images/mnist_5k', 'test/accuracy', 'test accuracy', 0.95, 120),
}


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--datasets', default=','.join(DATASETS), help='comma-separated')
  p.add_argument('--shared', default=SHARED, help='the shared/ data folder')
  p.add_argument('--workdir_root', default='/tmp/text_classification_bench',
                 help='each experiment trains in <root>/<dataset> (emptied first)')
  p.add_argument('--skip_ours', action='store_true', help='baselines only')
  p.add_argument('--skip_baselines', action='store_true', help='our experiments only')
  p.add_argument('--output', default='', help='append the report to this markdown file')
  return p.parse_args(argv)


def _load_config(experiment: str, data_dir: str):
  path = os.path.join(REPO_ROOT, 'experiments', f'{experiment}.py')
  spec = importlib.util.spec_from_file_location(f'experiment_{experiment}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = data_dir
  return config


def _load():
  return os.getloadavg()[0]


# ------------------------------------------------------------------------------------ ours

def run_ours(name: str, args) -> dict:
  experiment, sub, key, _, _, _ = DATASETS[name]
  workdir = os.path.join(args.workdir_root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'lm.main', f'--config=experiments/{experiment}.py',
         f'--workdir={workdir}', f'--config.data.data_dir={os.path.join(args.shared, sub)}']
  load_before = _load()
  t0 = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if done.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  final = [r for r in records if key in r][-1]
  per_epoch = [round(r['eval/accuracy'], 4) for r in records if 'eval/accuracy' in r]
  return {'value': final[key], 'wall_s': wall, 'load': (load_before, _load()),
          'eval_accuracy_per_epoch': per_epoch,
          'command': ' '.join(['python'] + cmd[1:])}


# ------------------------------------------------------------------------------- baselines

def _text_splits(name: str, args):
  """(train texts, train labels, test texts, test labels) as our experiment splits them."""
  from lm import labelled_text  # pylint: disable=g-import-not-at-top
  experiment, sub, key = DATASETS[name][:3]
  d = _load_config(experiment, os.path.join(args.shared, sub)).data
  train = labelled_text.read_split(d, d.train_split)
  if d.val_fraction > 0:
    train_rows, _ = labelled_text.hold_out(len(train.texts), d.val_fraction)
    train = train.take(train_rows)
  test = labelled_text.read_split(d, d.eval_split if key.startswith('eval/') else d.test_split)
  return train.texts, train.labels, test.texts, test.labels, d.positive_label


def _timed(fit_and_score) -> dict:
  load_before = _load()
  t0 = time.perf_counter()
  value = fit_and_score()
  return {'value': value, 'wall_s': time.perf_counter() - t0, 'load': (load_before, _load())}


def run_baselines(name: str, args) -> dict:
  # pylint: disable=g-import-not-at-top
  from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score, f1_score
  from sklearn.naive_bayes import MultinomialNB
  from sklearn.pipeline import make_pipeline
  # pylint: enable=g-import-not-at-top
  if name == 'mnist':
    return {'MLP 512-256 (scikit-learn, Adam)': _timed(lambda: _mnist_mlp(args))}
  x_train, y_train, x_test, y_test, positive = _text_splits(name, args)

  def score(model):
    def fit_and_score():
      model.fit(x_train, y_train)
      predicted = model.predict(x_test)
      if name == 'sms_spam':
        return f1_score(y_test, predicted, pos_label=positive)
      return accuracy_score(y_test, predicted)
    return _timed(fit_and_score)

  if name == 'sms_spam':
    return {
        'char 1-5-gram TF-IDF + LR': score(make_pipeline(
            TfidfVectorizer(analyzer='char_wb', ngram_range=(1, 5), sublinear_tf=True),
            LogisticRegression(C=10, max_iter=2000))),
        'naive Bayes (word counts)': score(make_pipeline(CountVectorizer(), MultinomialNB())),
    }
  return {'word 1-2-gram TF-IDF + LR': score(make_pipeline(
      TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
      LogisticRegression(C=10, max_iter=2000)))}


def _mnist_mlp(args) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  from lm import images  # pylint: disable=g-import-not-at-top
  experiment, sub = DATASETS['mnist'][:2]
  config = _load_config(experiment, os.path.join(args.shared, sub))
  train = images.load_split('', 'train', config.data.data_dir)
  train, _ = images.hold_out(train, config.data.val_fraction)
  test = images.load_split('', 'test', config.data.data_dir)
  flat = lambda s: s.images_NxHxWxC.reshape(len(s.labels_N), -1).astype(np.float32) / 255
  model = MLPClassifier(hidden_layer_sizes=(512, 256), solver='adam', learning_rate_init=1e-3,
                        batch_size=32, max_iter=20, random_state=0)
  model.fit(flat(train), train.labels_N)
  return float((model.predict(flat(test)) == test.labels_N).mean())


# ---------------------------------------------------------------------------------- report

def _machine() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    model = next(l.split(':', 1)[1].strip() for l in out.splitlines()
                 if l.startswith('Model name'))
  except (OSError, StopIteration):
    model = platform.processor() or 'unknown CPU'
  return f'{model}, {os.cpu_count()} cores'


def _versions() -> str:
  out = [f'python {platform.python_version()}']
  for module in ('jax', 'jaxlib', 'flax', 'optax', 'sklearn'):
    try:
      out.append(f'{module} {__import__(module).__version__}')
    except ImportError:
      pass
  return ', '.join(out)


def _wall(r: dict) -> str:
  minutes, seconds = divmod(round(r['wall_s']), 60)
  text = f'{minutes} min {seconds:02d} s' if minutes else f'{seconds} s'
  busy = max(r['load']) > (os.cpu_count() or 1)
  return f'{text}{" (under load)" if busy else ""}'


def _fmt(name: str, value: float) -> str:
  return f'{value:.3f}' if name == 'sms_spam' else f'{100 * value:.1f}%'


def report(results: dict, argv) -> str:
  lines = ['| dataset | metric | ours | ours: wall time | target | baseline: score, fit time | '
           'load avg (1 min, before / after ours) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name, r in results.items():
    _, _, _, what, target, limit = DATASETS[name]
    ours = r.get('ours')
    ours_text = _fmt(name, ours['value']) if ours else 'not run'
    met = ''
    if ours:
      met = ' (met)' if ours['value'] >= target and ours['wall_s'] <= limit else ' (missed)'
    base = '; '.join(f'{label} {_fmt(name, b["value"])}, {b["wall_s"]:.0f} s'
                     for label, b in r.get('baselines', {}).items()) or 'not run'
    load = f'{ours["load"][0]:.2f} / {ours["load"][1]:.2f}' if ours else '-'
    lines.append(f'| {name} | {what} | {ours_text}{met} | {_wall(ours) if ours else "-"} | '
                 f'>= {_fmt(name, target)} in <= {limit // 60} min | {base} | {load} |')
  lines.append('')
  for name, r in results.items():
    if r.get('ours'):
      lines.append(f'- {name}: `{r["ours"]["command"]}`; eval accuracy per evaluation: '
                   f'{r["ours"]["eval_accuracy_per_epoch"]}')
  lines += [
      '',
      f'Command: `{" ".join(["python", os.path.relpath(__file__, REPO_ROOT)] + argv)}`',
      f'Machine: {_machine()}; date: {datetime.datetime.now().isoformat(timespec="minutes")}; '
      f'load average at the end: {", ".join(f"{x:.2f}" for x in os.getloadavg())}',
      f'Versions: {_versions()}',
      'Wall time is the whole `python -m lm.main` command (start-up, tokenizing, compiling, '
      'training, every evaluation, checkpoints); "under load" marks a run during which the '
      '1-minute load average exceeded the core count. Baselines fit on the same training '
      'rows (train less the held-out validation rows) and score the same split.',
  ]
  return '\n'.join(lines)


def main(argv=None):
  args = _parse_args(argv)
  argv = sys.argv[1:] if argv is None else argv
  names = [n for n in args.datasets.split(',') if n]
  unknown = set(names) - set(DATASETS)
  if unknown:
    sys.exit(f'error: unknown datasets {sorted(unknown)}; use some of {", ".join(DATASETS)}')
  results = {}
  for name in names:
    results[name] = r = {}
    if not args.skip_ours:
      r['ours'] = run_ours(name, args)
      print(f'{name}: ours {_fmt(name, r["ours"]["value"])} in {_wall(r["ours"])}', flush=True)
    if not args.skip_baselines:
      r['baselines'] = run_baselines(name, args)
      for label, b in r['baselines'].items():
        print(f'{name}: {label} {_fmt(name, b["value"])} in {b["wall_s"]:.0f} s', flush=True)
  text = report(results, argv)
  print('\n' + text, flush=True)
  if args.output:
    with open(args.output, 'a') as f:
      f.write(text + '\n\n')


if __name__ == '__main__':
  main()
