#!/usr/bin/env python3
"""Fine-tuned against from scratch: the text classifiers started from experiments/text_pretrain.py.

Every cell trains through the real entry point (`python -m lm.main`, a fresh workdir, wall time
around the whole command). A fine-tuned cell is the experiment with
`--config.init.workdir=<pretrained>` (it adopts the pretrained trunk and SentencePiece model);
its scratch twin is the same model, the same tokenizer (the pretrained run's SentencePiece model,
written out as a file) and the same steps, from a random init. Budgets are short (this was
written for a shared 2-core CPU): every cell trains a fixed number of steps, not the
experiment's epochs.

  python benchmarks/transfer.py --pretrained=/tmp/pre --cells=sst2_all,sst2_1pct \
      --results=/tmp/transfer.jsonl --output=docs/TRANSFER.md

Without --pretrained it first runs experiments/text_pretrain.py into <workdir_root>/pre.
Each finished cell is appended to --results (JSON lines), so cells run in separate
invocations still make one table; the table (and the machine, date and load) goes to
--output.
"""

import argparse
import base64
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), 'shared')

# cell: (experiment, data dir under shared/, metric, steps, extra flags)
CELLS = {
    'sst2_all': ('sst2', 'text/sst2', 'eval/accuracy', 400, []),
    'sst2_10pct': ('sst2', 'text/sst2', 'eval/accuracy', 300, ['--config.data.train_fraction=0.1']),
    'sst2_1pct': ('sst2', 'text/sst2', 'eval/accuracy', 105, ['--config.data.train_fraction=0.01']),
    'sms_all': ('sms_spam', 'text/sms_spam', 'test/f1', 375, []),
    # 367 and 37 labelled messages (about 48 and 5 spam): 10 and about 35 passes over them.
    'sms_10pct': ('sms_spam', 'text/sms_spam', 'test/f1', 115, ['--config.data.train_fraction=0.1']),
    'sms_1pct': ('sms_spam', 'text/sms_spam', 'test/f1', 40, ['--config.data.train_fraction=0.01']),
}
_TRUNK = ('num_layers', 'num_heads', 'd_model', 'mlp_dim', 'seq_len')


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--pretrained', default='', help='a finished text_pretrain run (else: run one)')
  p.add_argument('--cells', default=','.join(CELLS), help='comma-separated: ' + ', '.join(CELLS))
  p.add_argument('--modes', default='scratch,finetune', help='which of the two per cell')
  p.add_argument('--workdir_root', default='/tmp/transfer_bench')
  p.add_argument('--results', default='/tmp/transfer_bench/results.jsonl')
  p.add_argument('--output', default='', help='append the table to this markdown file')
  p.add_argument('--extra', default='', help='--config.* flags (one string) added to every run '
                 'of this invocation, e.g. a fine-tuning recipe; needs --tag')
  p.add_argument('--tag', default='', help='names the variant: its rows are <cell>+<tag>')
  args = p.parse_args(argv)
  if bool(args.extra) != bool(args.tag):
    p.error('--extra and --tag go together: the tag names the variant in the table')
  return args


def _run(cmd: list[str], workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  done = subprocess.run(cmd + [f'--workdir={workdir}'], cwd=REPO_ROOT, capture_output=True,
                        text=True, check=False)
  wall = time.perf_counter() - t0
  if done.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {'records': records, 'wall_s': wall, 'load': [load_before, os.getloadavg()[0]],
          'command': ' '.join(['python'] + cmd[1:] + [f'--workdir={workdir}'])}


def pretrain(args) -> str:
  workdir = os.path.join(args.workdir_root, 'pre')
  r = _run([sys.executable, '-m', 'lm.main', '--config=experiments/text_pretrain.py'], workdir)
  final = [x for x in r['records'] if 'eval/loss' in x][-1]
  _append(args, {'cell': 'pretrain', 'mode': 'lm', 'value': final['eval/loss'],
                 'wall_s': r['wall_s'], 'load': r['load'], 'command': r['command']})
  return workdir


def _scratch_flags(pretrained: str, root: str) -> list[str]:
  """The pretrained run's trunk and SentencePiece model, without its weights."""
  with open(os.path.join(pretrained, 'config.json')) as f:
    model = json.load(f)['model']
  with open(os.path.join(pretrained, 'tokenizer.json')) as f:
    proto = base64.b64decode(json.load(f)['model_proto_base64'])
  path = os.path.join(root, 'pretrained_sentencepiece.model')
  os.makedirs(root, exist_ok=True)
  with open(path, 'wb') as f:
    f.write(proto)
  return ([f'--config.model.{k}={model[k]}' for k in _TRUNK] +
          ['--config.data.tokenizer=sentencepiece', f'--config.data.tokenizer_path={path}'])


def run_cell(cell: str, mode: str, args) -> dict:
  experiment, sub, key, steps, extra = CELLS[cell]
  cmd = [sys.executable, '-m', 'lm.main', f'--config=experiments/{experiment}.py',
         f'--config.data.data_dir={os.path.join(args.shared, sub)}',
         f'--config.train.steps={steps}', '--config.train.epochs=0',
         '--config.train.eval_every_epochs=0', '--config.train.eval_every=0'] + extra
  cmd += shlex.split(args.extra)
  if mode == 'finetune':
    cmd.append(f'--config.init.workdir={args.pretrained}')
  else:
    cmd += _scratch_flags(args.pretrained, args.workdir_root)
  name = f'{cell}+{args.tag}' if args.tag else cell
  r = _run(cmd, os.path.join(args.workdir_root, f'{name}_{mode}'))
  final = [x for x in r['records'] if key in x][-1]
  out = {'cell': name, 'mode': mode, 'metric': key, 'value': final[key], 'steps': steps,
         'wall_s': r['wall_s'], 'load': r['load'], 'command': r['command']}
  if 'test/accuracy' in final:
    out['test/accuracy'] = final['test/accuracy']
  return out


def _append(args, result: dict):
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, 'a') as f:
    f.write(json.dumps(result) + '\n')
  print(json.dumps(result), flush=True)


def _machine() -> str:
  out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
  model = next((l.split(':', 1)[1].strip() for l in out.splitlines()
                if l.startswith('Model name')), platform.processor() or 'unknown CPU')
  return f'{model}, {os.cpu_count()} cores'


def _wall(r: dict) -> str:
  minutes, seconds = divmod(round(r['wall_s']), 60)
  return f'{minutes} min {seconds:02d} s, load {r["load"][0]:.0f}-{r["load"][1]:.0f}'


def _fmt(r: dict) -> str:
  return f'{r["value"]:.3f}' if r['metric'] == 'test/f1' else f'{100 * r["value"]:.1f}%'


def report(results: list[dict]) -> str:
  latest = {(r['cell'], r['mode']): r for r in results}
  lines = [f'Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on '
           f'{_machine()}; python {platform.python_version()}.', '',
           '| cell | metric | steps | scratch | fine-tuned | gain | wall (scratch / fine-tuned) |',
           '|---|---|---|---|---|---|---|']
  for cell in dict.fromkeys(r['cell'] for r in results if r['cell'] != 'pretrain'):
    _, _, key, steps, _ = CELLS[cell.split('+')[0]]
    s, f = latest.get((cell, 'scratch')), latest.get((cell, 'finetune'))
    if not (s or f):
      continue
    gain = (f'{100 * (f["value"] - s["value"]):+.1f} pts' if s and f and key != 'test/f1' else
            f'{f["value"] - s["value"]:+.3f}' if s and f else '-')
    lines.append(f'| {cell} | {key} | {steps} | {_fmt(s) if s else "not run"} | '
                 f'{_fmt(f) if f else "not run"} | {gain} | '
                 f'{_wall(s) if s else "-"} / {_wall(f) if f else "-"} |')
  if ('pretrain', 'lm') in latest:
    p = latest[('pretrain', 'lm')]
    lines += ['', f'Pretraining: eval loss {p["value"]:.3f}, {_wall(p)}: `{p["command"]}`']
  return '\n'.join(lines) + '\n'


def main(argv=None):
  args = _parse_args(argv)
  args.shared = SHARED
  if not args.pretrained:
    args.pretrained = pretrain(args)
  for cell in filter(None, args.cells.split(',')):
    for mode in filter(None, args.modes.split(',')):
      _append(args, run_cell(cell, mode, args))
  with open(args.results) as f:
    table = report([json.loads(line) for line in f])
  print(table)
  if args.output:
    with open(args.output, 'a') as f:
      f.write('\n' + table)


if __name__ == '__main__':
  main()
