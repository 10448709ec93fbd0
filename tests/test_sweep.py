"""Sweeps: expansion helpers, trial names, skip-finished scheduling, summaries, kill/restart."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import _cli
from launch import _summary
from launch import _trials
from launch import sweep as sweep_launcher
from lm import sweeps

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _experiment(tmp_path, body: str, name: str = 'exp.py') -> str:
  path = tmp_path / name
  path.write_text(textwrap.dedent(f'''\
      import sys
      sys.path.insert(0, {HERE!r})
      from tiny_config import get_config
      from lm import sweeps
      ''') + textwrap.dedent(body))
  return str(path)


# --- lm.sweeps -----------------------------------------------------------------------------


def test_grid_is_the_product_with_the_last_axis_fastest():
  assert sweeps.grid({'optim.lr': [1, 2]}, seed=[0, 1]) == [
      {'optim.lr': 1, 'seed': 0}, {'optim.lr': 1, 'seed': 1},
      {'optim.lr': 2, 'seed': 0}, {'optim.lr': 2, 'seed': 1}]


def test_zipped_and_zip_pair_values_and_reject_unequal_lengths():
  assert sweeps.zipped({'optim.lr': [1, 2]}, seed=[5, 6]) == [
      {'optim.lr': 1, 'seed': 5}, {'optim.lr': 2, 'seed': 6}]
  assert sweeps.zip_(sweeps.grid(seed=[0, 1]), sweeps.grid({'optim.lr': [3, 4]})) == [
      {'seed': 0, 'optim.lr': 3}, {'seed': 1, 'optim.lr': 4}]
  with pytest.raises(ValueError, match='differ in length'):
    sweeps.zipped(a=[1, 2], b=[1])
  with pytest.raises(ValueError, match='different lengths'):
    sweeps.zip_([{'a': 1}], [{'b': 1}, {'b': 2}])


def test_product_composes_and_refuses_a_key_set_twice():
  combined = sweeps.product(sweeps.loguniform('optim.lr', 1e-4, 1e-2, n=3, seed=0),
                            sweeps.grid(seed=[0, 1]))
  assert len(combined) == 6 and all(set(t) == {'optim.lr', 'seed'} for t in combined)
  with pytest.raises(ValueError, match='seed'):
    sweeps.product(sweeps.grid(seed=[0]), sweeps.grid(seed=[1]))
  with pytest.raises(ValueError, match='list of values'):
    sweeps.grid(seed=3)


def test_loguniform_is_deterministic_in_range_and_seed_dependent():
  a = sweeps.loguniform('optim.lr', 1e-4, 1e-2, n=20, seed=7)
  assert a == sweeps.loguniform('optim.lr', 1e-4, 1e-2, n=20, seed=7)
  assert a != sweeps.loguniform('optim.lr', 1e-4, 1e-2, n=20, seed=8)
  values = [t['optim.lr'] for t in a]
  assert all(1e-4 <= v <= 1e-2 for v in values)
  # Log-uniform: draws land in both decades, not mostly in the upper one.
  assert any(v < 1e-3 for v in values) and any(v > 1e-3 for v in values)
  # Pinned draws: if these change, every seeded sweep's trial names (so its workdirs) change,
  # and a restarted sweep would not find its finished trials. Update only on purpose.
  assert values[:3] == [0.000444, 0.0002, 0.002]


# --- trials --------------------------------------------------------------------------------


def test_trial_names_are_readable_unique_and_safe():
  trials = sweeps.grid({'optim.lr': [1e-3, 3e-3], 'data.name': ['files:/a/*.txt']}, seed=[0])
  names = [_trials.trial_name(i, t, len(trials)) for i, t in enumerate(trials)]
  assert names[0] == '000_optim.lr=0.001,data.name=files__a__.txt,seed=0'
  assert len(set(names)) == len(names)
  assert all('/' not in n and '*' not in n for n in names)
  assert _trials.trial_name(1234, {'seed': 0}, 2000) == '1234_seed=0'


def test_expand_is_stable_and_carries_overrides_and_extra_args(tmp_path):
  exp = _experiment(tmp_path, '''
      def sweep():
        return sweeps.grid({'optim.lr': [1e-3, 3e-3]}, seed=[0, 1])
      ''')
  spec = _trials.expand(exp, str(tmp_path / 'sw'), ['--config.train.steps=5'])
  assert spec == _trials.expand(exp, str(tmp_path / 'sw'), ['--config.train.steps=5'])
  first = spec['trials'][0]
  assert first['workdir'] == str(tmp_path / 'sw' / '000_optim.lr=0.001,seed=0')
  assert first['args'] == [f'--config={exp}', f'--workdir={first["workdir"]}',
                           '--config.train.steps=5', '--config.optim.lr=0.001', '--config.seed=0']


@pytest.mark.parametrize('body,extra,needle', [
    ('', [], 'has no sweep()'),
    ('def sweep():\n  return [{"optim.lrr": 1.0}]\n', [], "'optim.lrr', which is not"),
    ('def sweep():\n  return []\n', [], 'non-empty list'),
    ('def sweep():\n  return [{"seed": 1}]\n', ['--config.seed=3'], 'seed is swept'),
    ('def sweep():\n  return [{"seed": 1}]\n', ['--workdir=/x'], '--workdir after --'),
])
def test_bad_sweeps_are_one_clear_error(tmp_path, body, extra, needle):
  with pytest.raises(_cli.UsageError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    _trials.expand(_experiment(tmp_path, body), str(tmp_path / 'sw'), extra)


def test_a_different_sweep_in_the_same_dir_is_refused(tmp_path):
  exp = _experiment(tmp_path, 'def sweep():\n  return sweeps.grid(seed=[0, 1])\n')
  sw = str(tmp_path / 'sw')
  _trials.write(sw, _trials.expand(exp, sw, []))
  _trials.write(sw, _trials.expand(exp, sw, []))  # The same sweep again: fine.
  with pytest.raises(_cli.UsageError, match='different sweep'):
    _trials.write(sw, _trials.expand(exp, sw, ['--config.train.steps=3']))


def test_cli_without_sweep_is_exit_2_and_one_line(tmp_path):
  exp = _experiment(tmp_path, '')
  result = subprocess.run([sys.executable, '-m', 'launch.sweep', f'--config={exp}',
                           f'--sweep_dir={tmp_path / "sw"}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and 'has no sweep()' in result.stderr


def test_grid_from_the_command_line_is_a_typed_product(tmp_path):
  exp = _experiment(tmp_path, '')  # No sweep() at all.
  spec = _trials.expand(exp, str(tmp_path / 'sw'), [],
                        ['optim.lr=1e-3,3e-3', 'seed=0,1', 'train.steps=1e3'])
  overrides = [t['overrides'] for t in spec['trials']]
  assert overrides == [{'optim.lr': lr, 'seed': seed, 'train.steps': 1000}
                       for lr in (1e-3, 3e-3) for seed in (0, 1)]
  assert all(type(o['seed']) is int and type(o['optim.lr']) is float for o in overrides)
  assert spec['trials'][0]['name'] == '000_optim.lr=0.001,seed=0,train.steps=1000'
  assert _trials.grid_trials(exp, ['model.use_bias=true,False']) == [
      {'model.use_bias': True}, {'model.use_bias': False}]
  assert _trials.grid_trials(exp, ['optim.name=adamw,lion']) == [
      {'optim.name': 'adamw'}, {'optim.name': 'lion'}]


@pytest.mark.parametrize('axes,needle', [
    (['optim.lrr=1e-3'], "'optim.lrr', which is not a config field"),
    (['seed=0,1.5'], "'1.5' is not an integer"),
    (['optim.lr=fast'], "'fast' is not a number"),
    (['model.use_bias=yes'], 'not true or false'),
    (['optim.step_boundaries=0.5'], 'cannot set optim.step_boundaries'),
    (['optim.lr'], 'needs FIELD=V1,V2'),
    (['seed=0', 'seed=1'], 'given twice'),
])
def test_bad_grid_axes_are_one_clear_error(tmp_path, axes, needle):
  with pytest.raises(_cli.UsageError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    _trials.expand(_experiment(tmp_path, ''), str(tmp_path / 'sw'), [], axes)


def test_cli_grid_on_an_experiment_without_sweep(tmp_path):
  exp = _experiment(tmp_path, '')
  result = subprocess.run([sys.executable, '-m', 'launch.sweep', f'--config={exp}',
                           f'--sweep_dir={tmp_path / "sw"}', '--grid', 'optim.lr=1e-3,3e-3',
                           '--grid=seed=0,1', '--dry_run'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  trials = json.loads(result.stdout)['trials']
  assert [t['args'][-2:] for t in trials] == [
      [f'--config.optim.lr={lr}', f'--config.seed={seed}'] for lr in ('0.001', '0.003')
      for seed in (0, 1)]


def test_index_ranges():
  assert sweep_launcher.index_ranges([0, 1, 2, 5, 7, 8]) == '0-2,5,7-8'
  assert sweep_launcher.index_ranges([3]) == '3'


# --- local scheduling with a fake trainer ----------------------------------------------------

_FAKE_TRAINER = '''#!{python}
import json, os, sys, time
args = dict(a.split('=', 1) for a in sys.argv[3:] if '=' in a)
workdir = args['--workdir']
with open(os.path.join(workdir, 'ran'), 'a') as f:
  f.write(os.environ['XLA_FLAGS'] + '\\n')
if args.get('--config.seed') == '2':
  print('boom', flush=True)
  sys.exit(3)
with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
  f.write(json.dumps({{'step': 5, 'eval/loss': float(args['--config.seed'])}}) + '\\n')
open(os.path.join(workdir, 'DONE'), 'w').write('{{}}')
'''


def test_local_backend_skips_done_resumes_partial_and_reports_failures(tmp_path, capsys):
  fake = tmp_path / 'fake_python'
  fake.write_text(_FAKE_TRAINER.format(python=sys.executable))
  fake.chmod(0o755)
  exp = _experiment(tmp_path, 'def sweep():\n  return sweeps.grid(seed=[0, 1, 2, 3])\n')
  sw = tmp_path / 'sw'
  spec = _trials.expand(exp, str(sw), [])
  done, partial = (spec['trials'][i]['workdir'] for i in (0, 1))
  os.makedirs(done)
  open(os.path.join(done, 'DONE'), 'w').write('{}')
  os.makedirs(partial)
  open(os.path.join(partial, 'metrics.jsonl'), 'w').write('{"step": 2, "train/loss": 1.0}\n')

  code = sweep_launcher.main([f'--config={exp}', f'--sweep_dir={sw}', '--parallel=2',
                              '--devices_per_trial=3', '--platform=cpu',
                              f'--python={fake}'])
  out = capsys.readouterr().out
  assert code == 1  # Trial 2 failed; the others still ran.
  assert not os.path.exists(os.path.join(done, 'ran')), 'a DONE trial was run again'
  assert 'skip    000_seed=0 (DONE)' in out
  assert 'FAILED  002_seed=2 (exit 3' in out and 'boom' in out
  for i in (1, 3):
    ran = open(os.path.join(spec['trials'][i]['workdir'], 'ran')).read()
    assert ran == '--xla_force_host_platform_device_count=3\n'
  rows = {r['index']: r for r in _summary.summarize(str(sw))}
  assert rows[2]['status'] == 'failed (3)' and rows[1]['status'] == 'done'


# --- summarize -----------------------------------------------------------------------------


def _fake_trial(sw, trial, evals, done=True):
  os.makedirs(trial['workdir'], exist_ok=True)
  with open(os.path.join(trial['workdir'], 'metrics.jsonl'), 'w') as f:
    for step, value in evals:
      f.write(json.dumps({'step': step, 'train/loss': value + 0.5}) + '\n')
      f.write(json.dumps({'step': step, 'eval/loss': value}) + '\n')
  if done:
    with open(os.path.join(trial['workdir'], 'DONE'), 'w') as f:
      json.dump({'step': evals[-1][0], 'eval/loss': evals[-1][1]}, f)


def test_summarize_ranks_trials_and_writes_table_csv_and_png(tmp_path):
  exp = _experiment(tmp_path, '''
      def sweep():
        return sweeps.grid({'optim.lr': [1e-4, 1e-3, 1e-2, 1e-1]})
      ''')
  sw = str(tmp_path / 'sw')
  spec = _trials.expand(exp, sw, [])
  _trials.write(sw, spec)
  t = spec['trials']
  _fake_trial(sw, t[0], [(10, 3.0), (20, 2.5)])
  _fake_trial(sw, t[1], [(10, 2.0), (20, 1.5)])
  _fake_trial(sw, t[2], [(10, 1.0), (20, 1.2)])  # Best final and best-ever differ here.
  _fake_trial(sw, t[3], [(10, 4.0)], done=False)
  result = subprocess.run([sys.executable, '-m', 'launch.sweep', 'summarize', sw], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  table_rows = [l for l in result.stdout.splitlines() if l.startswith('| 0')]
  assert [r.split(' | ')[0][2:] for r in table_rows] == [t[2]['name'], t[1]['name'],
                                                         t[0]['name'], t[3]['name']]
  with open(os.path.join(sw, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  assert [float(r['final eval/loss']) for r in rows] == [1.2, 1.5, 2.5, 4.0]
  assert float(rows[0]['best eval/loss']) == 1.0
  assert float(rows[0]['final train/loss']) == 1.7 and rows[0]['steps'] == '20'
  assert [r['status'] for r in rows] == ['done', 'done', 'done', 'partial']
  png = os.path.join(sw, 'summary.png')
  assert os.path.getsize(png) > 10_000 and open(png, 'rb').read(4) == b'\x89PNG'
  assert os.path.exists(os.path.join(sw, 'summary.md'))


def test_summary_keeps_the_last_row_per_step_and_keys_and_skips_torn_lines(tmp_path):
  rows = ['{"step": 5, "train/loss": 2.0}', '{"step": 5, "eval/loss": 1.9}',
          '{"step": 10, "train/loss": 1.5}', '{"step": 10, "eval/lo',  # Killed here.
          '{"step": 10, "train/loss": 1.4}', '{"step": 10, "eval/loss": 1.3}']  # Resumed.
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(rows) + '\n')
  assert _summary.read_metrics(str(tmp_path)) == [
      {'step': 5, 'train/loss': 2.0}, {'step': 5, 'eval/loss': 1.9},
      {'step': 10, 'train/loss': 1.4}, {'step': 10, 'eval/loss': 1.3}]


def test_summary_x_axis_is_log_for_rates_and_across_decades():
  assert _summary._log_x([1e-4, 1e-3, 1e-2])
  assert _summary._log_x([1e-3, 3e-3], 'optim.lr')  # A rate: log even within a decade.
  assert _summary._log_x([0.05, 0.1], 'optim.weight_decay')
  assert not _summary._log_x([50, 200], 'optim.warmup_steps')
  assert not _summary._log_x([0, 1, 100])
  assert not _summary._log_x([0.0, 1e-3], 'optim.lr')  # Zero has no place on a log axis.


def test_summary_columns_each_have_one_number_format():
  header = ['trial', 'optim.lr', 'optim.warmup_steps', 'final eval/loss', 'steps', 'status']
  body = [['000', 0.001, 50, 1.2, 200, 'done'], ['001', 3e-05, 200, 1.865, 200, 'done'],
          ['002', 0.3, 1000, None, 0, 'pending']]
  lines = _summary.markdown(header, body).splitlines()[2:]
  assert lines == ['| 000 | 1.00e-03 | 50 | 1.2000 | 200 | done |',
                   '| 001 | 3.00e-05 | 200 | 1.8650 | 200 | done |',
                   '| 002 | 3.00e-01 | 1000 |  | 0 | pending |']


# --- end to end with lm.main ---------------------------------------------------------------


@pytest.mark.slow
def test_sweep_killed_half_way_restarts_without_losing_or_repeating_trials(tmp_path):
  # Trials 2 and 3 run 50x longer, so they are still running when the signal lands.
  exp = _experiment(tmp_path, '''
      def sweep():
        return sweeps.grid({'train.steps': [20, 1000]}, seed=[0, 1])
      ''')
  sw = tmp_path / 'sw'
  cmd = [sys.executable, '-m', 'launch.sweep', f'--config={exp}', f'--sweep_dir={sw}',
         '--parallel=2', '--', '--config.model.num_layers=1', '--config.train.eval_every=250',
         '--config.train.checkpoint_every=250']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while len(list(sw.glob('*/DONE'))) < 2:
    assert first.poll() is None and time.time() < deadline, first.stdout.read()
    time.sleep(0.5)
  first.send_signal(signal.SIGTERM)  # Mid-sweep: trials 2 and 3 are running.
  out1, _ = first.communicate(timeout=120)
  assert first.returncode == 130, out1
  finished = {p.parent.name: (p.stat().st_mtime_ns, (p.parent / 'metrics.jsonl').read_text())
              for p in sw.glob('*/DONE')}
  assert len(finished) == 2, out1

  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stdout + second.stderr
  for name, (mtime, metrics) in finished.items():
    assert f'skip    {name} (DONE)' in second.stdout
    assert (sw / name / 'DONE').stat().st_mtime_ns == mtime, f'{name} was run again'
    assert (sw / name / 'metrics.jsonl').read_text() == metrics
  assert len(list(sw.glob('*/DONE'))) == 4

  summary = subprocess.run([sys.executable, '-m', 'launch.sweep', 'summarize', str(sw)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert summary.returncode == 0, summary.stderr
  rows = [l for l in summary.stdout.splitlines() if l.startswith('| 0')]
  assert len(rows) == 4 and all(r.rstrip(' |').endswith('done') for r in rows)
