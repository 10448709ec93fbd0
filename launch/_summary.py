"""`python -m launch.sweep summarize <sweep_dir>`: a table and a plot of a sweep's trials.

Writes summary.md, summary.csv (one row per trial, best first) and summary.png (the metric
against each swept hyperparameter, and every trial's curves), and prints the table.
"""

import argparse
import csv
import json
import math
import os
import re

from launch import _cli
from launch import _trials
from lm import metrics


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl rows, the last one per (step, keys) kept when a resumed run rewrote steps."""
  rows = {}
  for row in metrics.read(workdir):
    rows[(row.get('step'), tuple(sorted(row)))] = row
  return sorted(rows.values(), key=lambda r: r.get('step', 0))


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
  return [(r['step'], float(r[key])) for r in rows
          if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _last_attempts(sweep_dir: str) -> dict:
  path = os.path.join(sweep_dir, 'attempts.jsonl')
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          a = json.loads(line)
          last[a['index']] = a
  return last


def trial_row(trial: dict, metric: str, mode: str, attempt: dict | None) -> dict:
  rows = read_metrics(trial['workdir'])
  values = [v for _, v in series(rows, metric)]
  done = _trials.is_done(trial)
  if not values and done:  # The final metric is also in DONE.
    with open(os.path.join(trial['workdir'], 'DONE')) as f:
      final_metrics = json.load(f)
    if isinstance(final_metrics.get(metric), (int, float)):
      values = [float(final_metrics[metric])]
  train = series(rows, 'train/loss')
  if done:
    status = 'done'
  elif attempt and attempt['exit_code'] and not attempt.get('stopped'):
    status = f'failed ({attempt["exit_code"]})'
  else:
    status = 'partial' if rows else 'pending'
  pick = min if mode == 'min' else max
  return {'index': trial['index'], 'name': trial['name'], 'overrides': trial['overrides'],
          'final': values[-1] if values else None, 'best': pick(values) if values else None,
          'train_loss': train[-1][1] if train else None,
          'steps': max((r.get('step', 0) for r in rows), default=0), 'status': status,
          'curve': series(rows, metric), 'train_curve': train}


def summarize(sweep_dir: str, metric: str = 'eval/loss', mode: str = 'min') -> list[dict]:
  """Rows for every trial, sorted by the final metric (best first; trials without it last)."""
  spec = _trials.read(sweep_dir)
  attempts = _last_attempts(sweep_dir)
  rows = [trial_row(t, metric, mode, attempts.get(t['index'])) for t in spec['trials']]
  sign = 1 if mode == 'min' else -1
  return sorted(rows, key=lambda r: (r['final'] is None, sign * (r['final'] or 0), r['index']))


def swept_keys(rows: list[dict]) -> list[str]:
  keys = []
  for r in sorted(rows, key=lambda r: r['index']):
    keys += [k for k in r['overrides'] if k not in keys]
  return keys


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def column_format(values: list):
  """One format for a whole column, so its numbers line up and read alike: integers as such,
  other numbers fixed to 4 decimals, or all in 3-digit scientific notation when one of them
  is below 0.01 or at least 1e5 (learning rates: 1.00e-03, 3.00e-03)."""
  present = [v for v in values if v is not None]
  if not present or not all(_is_number(v) for v in present):
    return lambda v: '' if v is None else str(v)
  if all(isinstance(v, int) for v in present):
    return lambda v: '' if v is None else f'{v:d}'
  sizes = [abs(v) for v in present if v and math.isfinite(v)]
  scientific = bool(sizes) and (min(sizes) < 1e-2 or max(sizes) >= 1e5)
  return lambda v: '' if v is None else f'{v:.2e}' if scientific else f'{v:.4f}'


def table(rows: list[dict], metric: str) -> tuple[list[str], list[list]]:
  keys = swept_keys(rows)
  header = ['trial', *keys, f'final {metric}', f'best {metric}', 'final train/loss', 'steps',
            'status']
  body = [[r['name'], *(r['overrides'].get(k) for k in keys), r['final'], r['best'],
           r['train_loss'], r['steps'], r['status']] for r in rows]
  return header, body


def markdown(header: list[str], body: list[list]) -> str:
  formats = [column_format([row[i] for row in body]) for i in range(len(header))]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(f(v) for f, v in zip(formats, row)) + ' |' for row in body]
  return '\n'.join(lines) + '\n'


# Fields swept by factors, not steps: a log axis even over less than a decade.
_RATES = re.compile(r'(^|_)(lr|learning_rate)$|^(weight_decay|eps|l1|l2)$')


def _log_x(values: list, key: str = '') -> bool:
  """Log x axis for positive numbers that are rates (optim.lr, ...) or span at least a decade."""
  nums = [v for v in values if _is_number(v)]
  if not nums or len(nums) != len(values) or min(nums) <= 0:
    return False
  return bool(_RATES.search(key.split('.')[-1])) or max(nums) / min(nums) >= 10


def plot(rows: list[dict], metric: str, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  # A key set to one value in every trial is not swept: nothing to plot against it.
  keys = [k for k in swept_keys(rows)
          if len({json.dumps(r['overrides'].get(k)) for r in rows}) > 1]
  panels = len(keys) + 2
  fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
  axes = axes[0]
  done = [r for r in rows if r['final'] is not None]
  for ax, key in zip(axes, keys):
    points = [(r['overrides'][key], r['final']) for r in done if key in r['overrides']]
    xs = [x for x, _ in points]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if not numeric:  # Categories (strings, booleans) sit at evenly spaced positions.
      labels = sorted({str(x) for x in xs})
      ax.set_xticks(range(len(labels)), labels)
      xs = [labels.index(str(x)) for x in xs]
    ax.scatter(xs, [y for _, y in points])
    if numeric and xs and _log_x(xs, key):
      ax.set_xscale('log')
    ax.set(xlabel=key, ylabel=f'final {metric}', title=f'{metric} vs {key}')
    ax.grid(alpha=0.3)
  for ax, curve_key, title in ((axes[-2], 'curve', metric), (axes[-1], 'train_curve',
                                                              'train/loss')):
    for r in sorted(rows, key=lambda r: r['index']):
      if r[curve_key]:
        ax.plot(*zip(*r[curve_key]), label=r['name'], marker='.' if len(r[curve_key]) < 30
                else None)
    ax.set(xlabel='step', title=title)
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
      ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog='python -m launch.sweep summarize')
  p.add_argument('sweep_dir')
  p.add_argument('--metric', default='eval/loss', help='Metric to rank trials by.')
  p.add_argument('--mode', choices=('min', 'max'), default='min', help='Lower or higher is better.')
  args = p.parse_args(argv)
  rows = summarize(args.sweep_dir, args.metric, args.mode)
  if all(r['final'] is None for r in rows):
    raise _cli.UsageError(f'no trial in {args.sweep_dir} has logged {args.metric!r} yet')
  header, body = table(rows, args.metric)
  text = markdown(header, body)
  with open(os.path.join(args.sweep_dir, 'summary.md'), 'w') as f:
    f.write(f'Sweep {args.sweep_dir}: trials sorted by final {args.metric}, best '
            f'({args.mode}) first.\n\n{text}')
  with open(os.path.join(args.sweep_dir, 'summary.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([['' if v is None else v for v in row] for row in body])
  plot(rows, args.metric, os.path.join(args.sweep_dir, 'summary.png'))
  print(text, end='')
  print(f'wrote {args.sweep_dir}/summary.md, summary.csv, summary.png')
  return 0
