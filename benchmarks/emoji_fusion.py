#!/usr/bin/env python3
"""Image-only, text-only and every fusion on the emoji data, for both label sets, as a table.

Each run is the user's command, `python -m lm.main --config=experiments/emoji_fusion.py`, with
`--config.model.fusion=<f>` (modality dropout 0 for the single-modality baselines, which have
nothing to drop) and, for the 98 subcategories, `--config.data.label_key=subcategory
--config.model.num_classes=98`. The experiment evaluates the held-out validation split (10% of
train's emoji) after every epoch and keeps every epoch's checkpoint; this driver then picks the
epoch with the best validation accuracy (the earliest on a tie) and evaluates that checkpoint
on the test split, once. Test at the last epoch is shown beside it.

  python benchmarks/emoji_fusion.py --data_dir=../shared/multimodal/emoji --root=/tmp/emoji \
      --output=docs/MULTIMODAL.md

Wall time is the whole `lm.main` process (start-up, decoding the PNGs, compiling, training,
the per-epoch evaluations); the 1-minute load average is read before every run. The report
(table, commands, machine, date, `uptime` before and after) is printed and appended to
`--output`. `--fusions`, `--label_keys` and trailing `--config.*` overrides narrow or vary it.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # This checkout's lm, whatever the venv has installed.
EXPERIMENT = 'experiments/emoji_fusion.py'
FUSIONS = ('image_only', 'text_only', 'concat', 'average', 'gated', 'attention')


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data_dir', default=os.path.join(os.path.dirname(REPO_ROOT), 'shared',
                                                    'multimodal', 'emoji'))
  p.add_argument('--root', default='/tmp/emoji_fusion',
                 help='one workdir per run under it, deleted first if it exists')
  p.add_argument('--fusions', default=','.join(FUSIONS))
  p.add_argument('--label_keys', default='label,subcategory')
  p.add_argument('--output', default='', help='append the report to this file too')
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    p.error(f'unknown arguments {bad}; only --config.* overrides pass through to lm.main')
  args.data_dir = os.path.abspath(args.data_dir)  # The runs start in the repository root.
  return args, overrides


def _num_classes(data_dir: str, label_key: str) -> int:
  with open(os.path.join(data_dir, 'train.jsonl'), encoding='utf-8') as f:
    return len({json.loads(line)[label_key] for line in f if line.strip()})


def _load_1min() -> float:
  return os.getloadavg()[0]


def _uptime() -> str:
  return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def _train(args, fusion: str, label_key: str, overrides) -> dict:
  workdir = os.path.join(args.root, f'{label_key}_{fusion}')
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)  # A finished run there would only be re-evaluated, not retimed.
  cmd = [sys.executable, '-m', 'lm.main', f'--config={EXPERIMENT}', f'--workdir={workdir}',
         f'--config.data.data_dir={args.data_dir}', f'--config.model.fusion={fusion}',
         f'--config.data.label_key={label_key}',
         f'--config.model.num_classes={_num_classes(args.data_dir, label_key)}']
  if fusion in ('image_only', 'text_only'):
    cmd.append('--config.model.modality_dropout=0')
  cmd += overrides
  load = _load_1min()
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  print(f'{label_key} {fusion}: {wall:.0f} s', flush=True)
  return {'workdir': workdir, 'wall_s': wall, 'load': load,
          'command': 'python ' + ' '.join(cmd[1:])}


def _evals(workdir: str) -> list[dict]:
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if 'eval/accuracy' in r and 'eval/data_dir' not in r]


def _test_at(workdir: str, step: int) -> dict:
  """Test-split metrics of the checkpoint at `step` (this process evaluates; nothing trains)."""
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  from lm import train  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(workdir)
  config.data.test_split = 'test'
  trainer = train.Trainer(config, workdir)
  if step not in trainer.ckpt.all_steps():
    raise SystemExit(f'{workdir}: no checkpoint at step {step} (have {trainer.ckpt.all_steps()});'
                     ' the experiment must checkpoint at every evaluation and keep them all')
  state = checkpoint.restore(trainer.ckpt, step, trainer.abstract_state)
  return trainer.evaluate(state, 'test', prefix='test')


def _row(run: dict) -> dict:
  evals = _evals(run['workdir'])
  best = max(evals, key=lambda r: (r['eval/accuracy'], -r['step']))
  last = evals[-1]
  steps_per_epoch = evals[0]['step']
  test_last = _test_at(run['workdir'], last['step'])
  # Second, so the workdir's classes_test.md and confusion_test.png are the chosen epoch's.
  test = _test_at(run['workdir'], best['step'])
  return {**run, 'val': best['eval/accuracy'], 'epoch': best['step'] // steps_per_epoch,
          'epochs': last['step'] // steps_per_epoch, 'test': test, 'test_last': test_last}


def _table(rows) -> str:
  out = ['| labels | model | val acc (best epoch) | test acc | test macro-F1 | test acc, last '
         'epoch | wall | load |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    out.append(f'| {r["label_key"]} | {r["fusion"]} | {100 * r["val"]:.1f}% ({r["epoch"]}/'
               f'{r["epochs"]}) | {100 * r["test"]["test/accuracy"]:.1f}% | '
               f'{r["test"]["test/macro_f1"]:.3f} | '
               f'{100 * r["test_last"]["test/accuracy"]:.1f}% | '
               f'{int(r["wall_s"] // 60)} min {int(r["wall_s"] % 60):02d} s | {r["load"]:.1f} |')
  return '\n'.join(out)


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}'


def main(argv=None):
  args, overrides = _parse_args(argv)
  before = _uptime()
  rows = []
  for label_key in args.label_keys.split(','):
    for fusion in args.fusions.split(','):
      run = _train(args, fusion, label_key, overrides)
      rows.append({**_row(run), 'fusion': fusion, 'label_key': label_key})
  after = _uptime()
  report = '\n'.join([
      f'### emoji fusion, {datetime.date.today().isoformat()}', '',
      f'`python benchmarks/emoji_fusion.py {" ".join(sys.argv[1:] if argv is None else argv)}`'
      f' on {_machine()}.', '',
      f'`uptime` before: `{before}`; after: `{after}`. Load is the 1-minute load average when '
      'each run started.', '',
      'Test accuracy and macro-F1 are at the epoch with the best validation accuracy.', '',
      _table(rows), '', 'Commands:', '',
      *[f'    {r["command"]}' for r in rows], ''])
  print(report)
  if args.output:
    with open(args.output, 'a', encoding='utf-8') as f:
      f.write('\n' + report)


if __name__ == '__main__':
  main()
