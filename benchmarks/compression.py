#!/usr/bin/env python3
"""The compression trade-off table (docs/COMPRESSION.md): every cell from the real commands.

For one model family it trains a float baseline, then from it (`--config.init.workdir`)
fine-tunes pruned copies (50/80/90% unstructured and 2:4) and a QAT copy, writes int8 exports
with `python -m lm.quantize` (PTQ of the baseline, int8 of the QAT run) and float32 ones (the
size of the float weights on disk), trains a smaller student with the baseline as its teacher
(`--config.distill.teacher_workdir`) and the same student from scratch, and evaluates each
with `--mode=eval`. Eval throughput is the items (tokens, images or messages; padding rows not
counted) per second of a second pass over the eval split inside the same process, the first
pass having compiled everything.

  .venv/bin/python benchmarks/compression.py --family=lm --out=/tmp/compress_lm
  .venv/bin/python benchmarks/compression.py --family=cnn --out=/tmp/compress_cnn
  .venv/bin/python benchmarks/compression.py --family=text --out=/tmp/compress_text

Schedules are short (flags below) so that a 2-core CPU runs a family in minutes; the table
says so. Results: <out>/results.json and a markdown table on stdout.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, '..', 'shared', 'tfds')
TEXT_DATA = os.path.join(ROOT, '..', 'shared', 'text', 'sms_spam')

FAMILIES = {
    # The Shakespeare char LM (4 layers) and a 2-layer student of it.
    'lm': dict(experiment='experiments/shakespeare_char.py', metrics=('eval/loss',), data=DATA,
               student_experiment='experiments/shakespeare_char.py',
               student=['--config.model.num_layers=2'],
               common=['--config.train.eval_every=100000', '--config.train.log_every=100',
                       '--config.train.checkpoint_every=100000']),
    # ResNet-20 (CIFAR-10), the seed CNN as its student.
    'cnn': dict(experiment='experiments/cifar10_resnet20.py', metrics=('eval/accuracy',),
                data=DATA,
                student_experiment='experiments/cifar10_simple_cnn.py', student=[],
                common=['--config.train.epochs=0', '--config.train.eval_every=100000',
                        '--config.train.log_every=50', '--config.train.checkpoint_every=100000',
                        '--config.optim.warmup_steps=10'],
                # 2:4 groups run along input channels; the RGB stem's 3 do not divide by 4.
                nm=['--config.prune.skip=^Conv_0/']),
    # The SMS spam encoder (2 blocks, width 64); a 1-block, width-32 student. Spam F1 on the
    # test split first: 13% of the messages are spam, so accuracy alone flatters a model that
    # misses them. Both at the decision threshold each run chose on its validation split at
    # its last step (threshold.json, copied into the exports); ROC AUC needs no threshold.
    'text': dict(experiment='experiments/sms_spam.py',
                 metrics=('test/f1', 'test/accuracy', 'test/roc_auc'),
                 data=TEXT_DATA, student_experiment='experiments/sms_spam.py',
                 student=['--config.model.num_layers=1', '--config.model.d_model=32'],
                 common=['--config.train.epochs=0', '--config.train.eval_every_epochs=0',
                         '--config.train.eval_every=100000', '--config.train.log_every=50',
                         '--config.train.checkpoint_every=100000']),
}


def _lm_main(args, log):
  cmd = [sys.executable, '-m', 'lm.main', *args]
  start = time.time()
  with open(log, 'w') as f:
    rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
  if rc:
    raise RuntimeError(f'{" ".join(cmd)} exited {rc}; see {log}')
  return time.time() - start


def _quantize(src, dst, dtype, log):
  shutil.rmtree(dst, ignore_errors=True)  # An interrupted driver's; it is rebuilt in seconds.
  cmd = [sys.executable, '-m', 'lm.quantize', f'--workdir={src}', f'--output={dst}',
         f'--dtype={dtype}']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  with open(log, 'w') as f:
    f.write(out.stdout + out.stderr)
  if out.returncode:
    raise RuntimeError(f'{" ".join(cmd)} exited {out.returncode}; see {log}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _evaluate(workdir, experiment, log):
  """--mode=eval's metrics, and the items/s of a second eval pass (worker process)."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', workdir, experiment]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  with open(log, 'w') as f:
    f.write(out.stdout + out.stderr)
  if out.returncode:
    raise RuntimeError(f'eval of {workdir} exited {out.returncode}; see {log}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(workdir, experiment):
  """What --mode=eval does (the experiment under the workdir's config.json), then a second,
  timed pass over the eval split."""
  sys.path.insert(0, ROOT)
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lm import main  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(ROOT, experiment))
  with open(os.path.join(workdir, 'config.json')) as f:
    main._overlay(config, json.load(f), set())  # pylint: disable=protected-access
  config_lib.split_cpu_devices(config)
  from lm import train  # pylint: disable=g-import-not-at-top  (after the CPU split)
  trainer = train.Trainer(config, workdir, read_only=True, training=False)
  result = trainer.evaluate_latest()  # Compiles, warms the data.
  _, state = _restore(trainer)
  count = [0]
  batches = trainer.task.eval_batches

  def counted(split):
    for b in batches(split):
      if 'valid' in b:  # Classifiers (images or text): examples, not the padding rows.
        count[0] += int(b['valid'].sum())
      else:  # The LM: tokens.
        count[0] += b['tokens'].shape[0] * b['tokens'].shape[1]
      yield b
  trainer.task.eval_batches = counted
  start = time.perf_counter()
  trainer.evaluate(state, config.data.eval_split)
  seconds = time.perf_counter() - start
  result.update(items_per_s=count[0] / seconds, eval_items=count[0])
  print(json.dumps(result))
  return 0


def _restore(trainer):
  from lm import checkpoint, quantize  # pylint: disable=g-import-not-at-top
  if trainer.config.quant.export:
    return quantize.restore_latest(trainer.workdir, trainer.abstract_state,
                                   trainer.config.quant.export, '')
  return checkpoint.restore_latest(trainer.workdir, trainer.abstract_state, then='')


def table(results, metrics) -> str:
  """The markdown rows of results.json (one per row run), one column per metric."""
  lines = [f'| model | parameters (nonzero) | bytes on disk | {" | ".join(metrics)} | '
           'eval items/s |', '| --- ' * (4 + len(metrics)) + '|']
  for row, r in results['rows'].items():
    params = r['quantize_report']['float32_weight_bytes'] // 4
    nonzero = f' ({r["nonzero_params"]:,})' if 'nonzero_params' in r else ''
    values = ' | '.join(f'{r["eval"][m]:.4f}' for m in metrics)
    lines.append(f'| {row} | {params:,}{nonzero} | {r["bytes_on_disk"]:,} | {values} | '
                 f'{r["eval"]["items_per_s"]:,.0f} |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--family', choices=sorted(FAMILIES), default='lm')
  p.add_argument('--out', required=True)
  p.add_argument('--steps', type=int, default=600, help='float baseline and students')
  p.add_argument('--finetune_steps', type=int, default=300, help='pruned and QAT runs')
  p.add_argument('--batch_size', type=int, default=0, help='0: the experiment\'s')
  p.add_argument('--student_steps', type=int, default=0, help='0: --steps')
  p.add_argument('--table', action='store_true', help='print results.json as markdown')
  p.add_argument('--only', default='', help='rows to run, separated by ; (default all)')
  if sys.argv[1:2] == ['--worker']:
    return _worker(sys.argv[2], sys.argv[3])
  a = p.parse_args()
  fam = FAMILIES[a.family]
  os.makedirs(a.out, exist_ok=True)
  res_path = os.path.join(a.out, 'results.json')
  results = json.load(open(res_path)) if os.path.exists(res_path) else {
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs',
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes'),
      'load_at_start': os.getloadavg(), 'rows': {}}
  if a.table:
    print(table(results, fam['metrics']))
    return 0
  only = set(filter(None, a.only.split(';')))
  batch = [f'--config.train.batch_size={a.batch_size}'] if a.batch_size else []
  data = [f'--config.data.data_dir={fam["data"]}']
  w = lambda name: os.path.join(a.out, name)  # pylint: disable=unnecessary-lambda-assignment
  dense = w('dense')
  student_steps = a.student_steps or a.steps
  runs = {
      'float': (fam['experiment'], [f'--config.train.steps={a.steps}'], dense),
      # The control: as many more float steps as the pruned and QAT runs fine-tune for.
      'float, fine-tuned': (fam['experiment'], [], None),
      'pruned 50%': (fam['experiment'], ['--config.prune.sparsity=0.5'], None),
      'pruned 80%': (fam['experiment'], ['--config.prune.sparsity=0.8'], None),
      'pruned 90%': (fam['experiment'], ['--config.prune.sparsity=0.9'], None),
      'pruned 2:4': (fam['experiment'], ['--config.prune.pattern=2:4', *fam.get('nm', [])], None),
      'int8 QAT': (fam['experiment'], ['--config.quant.qat=True'], None),
      'student, distilled': (fam['student_experiment'],
                             [f'--config.train.steps={student_steps}', *fam['student'],
                              f'--config.distill.teacher_workdir={dense}'], None),
      'student, from scratch': (fam['student_experiment'],
                                [f'--config.train.steps={student_steps}', *fam['student']], None),
  }
  order = ['float', 'int8 PTQ', 'float, fine-tuned', 'pruned 50%', 'pruned 80%', 'pruned 90%', 'pruned 2:4',
           'int8 QAT', 'student, distilled', 'student, from scratch']
  for row in order:
    if only and row not in only or row in results['rows']:
      continue
    slug = row.replace(' ', '_').replace(',', '').replace('%', '').replace(':', 'of')
    r = {'started': time.strftime('%H:%M:%S', time.gmtime()), 'load': os.getloadavg()[0]}
    if row == 'int8 PTQ':
      q = _quantize(dense, w('dense_int8'), 'int8', w('ptq_quantize.log'))
      r.update(bytes_on_disk=q['bytes_on_disk'],
               eval=_evaluate(w('dense_int8'), fam['experiment'], w('ptq_eval.log')),
               command=f'python -m lm.quantize --workdir={dense} --output={w("dense_int8")}')
    else:
      exp, extra, run_dir = runs[row]
      run_dir = run_dir or w(slug)
      args = [f'--config={exp}', f'--workdir={run_dir}', *data, *fam['common'], *batch, *extra]
      if row != 'float' and not row.startswith('student'):
        args += [f'--config.init.workdir={dense}', f'--config.train.steps={a.finetune_steps}']
        if row.startswith('pruned') and '2:4' not in row:
          # Gradual: the cubic ramp over the first half, the second half at the target.
          args += ['--config.prune.start_step=0',
                   f'--config.prune.end_step={a.finetune_steps // 2}',
                   f'--config.prune.every={max(1, a.finetune_steps // 12)}']
      if not os.path.exists(os.path.join(run_dir, 'DONE')):  # Trained by an interrupted driver.
        r['train_seconds'] = _lm_main(args, run_dir + '.train.log')
      r['command'] = 'python -m lm.main ' + ' '.join(args)
      if row == 'int8 QAT':
        q = _quantize(run_dir, run_dir + '_int8', 'int8', run_dir + '.quantize.log')
        r['eval_qat_float'] = _evaluate(run_dir, exp, run_dir + '.eval.log')
        run_dir += '_int8'
      else:
        q = _quantize(run_dir, run_dir + '_f32', 'float32', run_dir + '.quantize.log')
      r['bytes_on_disk'] = q['bytes_on_disk']
      r['eval'] = _evaluate(run_dir, exp, run_dir + '.eval.log')
      sparsity = os.path.join(runs[row][2] or w(slug), 'sparsity.json')
      if os.path.exists(sparsity):
        with open(sparsity) as f:
          s = json.load(f)
        r['params'], r['nonzero_params'] = s['params'], s['nonzero_params']
    r['quantize_report'] = {k: v for k, v in q.items() if k != 'layers'}
    if os.path.exists(res_path):  # Another driver on the same --out may have added rows.
      with open(res_path) as f:
        results['rows'] = {**json.load(f)['rows'], **results['rows']}
    results['rows'][row] = r
    with open(res_path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(res_path + '.tmp', res_path)
    print(row, json.dumps({k: v for k, v in r.items() if k != 'command'}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
