"""The command line: bad input is one line on stderr, exit code 2, and nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'tiny_config.py')
TINY_CNN = os.path.join(HERE, 'tiny_cnn_config.py')


def lm_main(*args, env_extra=None, timeout=300):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, '-m', 'lm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('args,needle', [
    (['--config.train.stepz=5'], 'stepz'),
    (['--config.train.steps=five'], 'steps'),
    (['--config.mesh.data=3'], '= 3 but there are 2 devices'),
    (['--config.train.batch_size=7', '--config.mesh.data=2'], 'divisible by the 2 data shards'),
    (['--config.data.name=no_such_dataset'], 'no_such_dataset'),
    (['--config.data.eval_split=nope'], 'nope'),
    (['--config.data.data_dir=/does/not/exist'], '/does/not/exist'),
    (['--config.data.name=files:/does/not/exist/*.txt'], 'files'),
    (['--config.model.seq_len=2000000'], 'shorter than one sequence'),
    (['--config.optim.name=adamww'], 'adamw'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
  workdir = tmp_path / 'run'
  result = lm_main(f'--config={TINY}', f'--workdir={workdir}', *args,
                   env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert needle in lines[0]
  assert not workdir.exists()


def test_missing_config_file_is_a_clear_error(tmp_path):
  result = lm_main('--config=experiments/nope.py', f'--workdir={tmp_path}')
  assert result.returncode == 2 and 'nope.py' in result.stderr


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--mode=eval')
  assert result.returncode == 2
  assert 'no checkpoint' in result.stderr and 'Traceback' not in result.stderr


def test_train_then_eval_appends_results(tmp_path):
  assert lm_main(f'--config={TINY}', f'--workdir={tmp_path}').returncode == 0
  assert (tmp_path / 'DONE').exists() and (tmp_path / 'config.json').exists()
  before = (tmp_path / 'metrics.jsonl').read_text().count('\n')
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--mode=eval')
  assert result.returncode == 0, result.stderr
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == before + 1 and '"eval/loss"' in lines[-1]


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path / "x"}', '--dry_run',
                   '--config.mesh.fsdp=4', '--config.mesh.tensor=2')
  assert result.returncode == 0, result.stderr
  for needle in ('mesh: data=1, fsdp=4, tensor=2', 'parameters:', 'FLOPs per step',
                 'per device: params', 'predicted step time'):
    assert needle in result.stdout
  assert not (tmp_path / 'x').exists()


def test_one_text_file_trains_and_validates_on_its_last_tenth(tmp_path):
  """The commonest corpus, an input.txt: files: needs no second file (test_data has the cut)."""
  rng = np.random.default_rng(0)
  (tmp_path / 'input.txt').write_text(''.join(rng.choice(list('ab cd\n'), size=20_000)))
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path / "run"}',
                   f'--config.data.name=files:{tmp_path}/input.txt', '--config.train.steps=4',
                   '--config.train.checkpoint_every=4')
  assert result.returncode == 0, result.stderr
  for needle in ('train: 18,000 tokens', 'eval: 2,000 tokens',
                 'validation: the last 10% of their bytes (data.val_fraction=0 means 0.1'):
    assert needle in result.stdout, result.stdout
  assert (tmp_path / 'run' / 'DONE').exists()


@pytest.mark.parametrize('config,extra,needles', [
    (TINY, ['--config.model.num_layers=11'],
     ['data: tiny_shakespeare: no text read', 'ASSUMED 256 characters', '; 20 steps: ']),
    (TINY_CNN, [], ['images 32x32x3, 10 classes, 256 training examples', '; 300 steps: ']),
    ('experiments/sms_spam.py', [], ['vocab 10,003', 'steps unknown: train.epochs=10']),
], ids=['lm', 'cifar', 'text'])
def test_dry_run_plans_from_the_config_without_the_data(tmp_path, config, extra, needles):
  """The README's plan command on a fresh machine: no dataset there, and none needed."""
  result = lm_main(f'--config={config}', f'--workdir={tmp_path / "x"}', '--dry_run',
                   '--config.data.data_dir=/nonexistent', *extra)
  assert result.returncode == 0, result.stderr
  for needle in needles + ['parameters:', 'FLOPs per step', 'predicted step time']:
    assert needle in result.stdout, result.stdout
  if config == TINY:  # 11 blocks, listed as read: block_2 before block_10.
    assert result.stdout.index('block_2/') < result.stdout.index('block_10/')
  assert not (tmp_path / 'x').exists()


def _device_count(monkeypatch, cores, **overrides):
  from lm import config as base  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(cores)))
  for var in ('LM_NUM_PROCESSES', 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS'):
    monkeypatch.delenv(var, raising=False)
  c = base.get_config()
  for key, value in overrides.items():
    section, field = key.split('__')
    c[section][field] = value
  return base.cpu_device_count(c)


def test_cpu_host_is_split_one_device_per_core_when_the_batch_divides(monkeypatch):
  assert _device_count(monkeypatch, 2, train__batch_size=12) == 2
  assert _device_count(monkeypatch, 8, train__batch_size=12) == 6  # Largest that divides 12.
  assert _device_count(monkeypatch, 4, train__batch_size=7) == 1
  assert _device_count(monkeypatch, 4, train__batch_size=8, train__grad_accum_steps=4) == 2
  assert _device_count(monkeypatch, 4, train__batch_size=8, mesh__cpu_devices=1) == 1
  # A fixed mesh gets exactly its size; a partly fixed one a multiple of it.
  assert _device_count(monkeypatch, 8, mesh__data=2) == 2
  assert _device_count(monkeypatch, 8, train__batch_size=16, mesh__tensor=2) == 8
  assert _device_count(monkeypatch, 3, train__batch_size=16, mesh__tensor=2) == 2


def test_cpu_split_is_off_with_several_processes(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(4)))
  from lm import config as base  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('LM_NUM_PROCESSES', '2')
  assert base.cpu_device_count(base.get_config()) == 1


@pytest.mark.parametrize('var', ['LM_NUM_PROCESSES', 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS'])
def test_fixed_mesh_is_shared_between_the_processes(monkeypatch, var):
  """2 Slurm tasks with fsdp=2 each made 2 devices, 4 in all, and both refused the mesh."""
  from lm import config as base  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(os, 'sched_getaffinity', lambda _: set(range(4)))
  for other in ('LM_NUM_PROCESSES', 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS'):
    monkeypatch.delenv(other, raising=False)
  monkeypatch.setenv(var, '2')
  if var.startswith('SLURM'):
    monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[1-2]')  # In a step that srun started.
  c = base.get_config()
  c.mesh.update(data=1, fsdp=2, tensor=1)
  assert base.cpu_device_count(c) == 1
  c.mesh.update(data=2, fsdp=2, tensor=2)
  assert base.cpu_device_count(c) == 4
  c.mesh.update(data=1, fsdp=3, tensor=1)
  with pytest.raises(base.ConfigError, match=r'= 3 devices do not split evenly over 2 processes'):
    base.cpu_device_count(c)


def test_a_slurm_batch_script_is_one_process(monkeypatch):
  """SLURM_NTASKS=2 is set in the batch script too; lm.main run there (without srun) took it
  for 2 processes and died in jax.distributed.initialize (no coordinator outside a step)."""
  from lm import config as base  # pylint: disable=g-import-not-at-top
  for var in ('LM_NUM_PROCESSES', 'SLURM_STEP_NUM_TASKS', 'SLURM_STEP_NODELIST'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('SLURM_NTASKS', '2')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  assert base.num_processes() == 1
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'vm')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
  assert base.num_processes() == 2


def test_negative_cpu_devices_is_a_clear_error(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.mesh.cpu_devices=-2')
  assert result.returncode == 2 and 'mesh.cpu_devices=-2' in result.stderr


def test_default_run_splits_this_cpu_per_core(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--dry_run')
  assert result.returncode == 0, result.stderr
  cores = len(os.sched_getaffinity(0))
  expected = max(n for n in range(1, cores + 1) if 8 % n == 0)  # TINY's batch is 8.
  assert f'mesh: data={expected}, fsdp=1, tensor=1' in result.stdout


def test_help_lists_the_flags_and_config_help_every_field():
  result = lm_main('--help')
  assert result.returncode == 0 and '--workdir' in result.stdout and '--config_help' in result.stdout
  result = lm_main('--config_help')
  assert result.returncode == 0
  fields = dict(line.split(' = ', 1) for line in result.stdout.splitlines())
  assert fields['train.steps'].split()[0] == '2000' and 'Optimizer steps' in fields['train.steps']
  assert 'one per core' in fields['mesh.cpu_devices']  # A comment on the lines above.
  from lm import config as base  # pylint: disable=g-import-not-at-top
  flat = {f'{s}.{k}' if isinstance(v, dict) else s
          for s, v in base.get_config().to_dict().items()
          for k in (v if isinstance(v, dict) else [None])}
  assert set(fields) == flat


@pytest.mark.parametrize('args,line', [
    (['--config.train.stpes=5'], "error: no config field 'stpes'; did you mean 'steps'?"),
    (['--wokrdir=/tmp/x'], 'error: no flag --wokrdir; did you mean --workdir?'),
    (['--config.optim.lr=nan'], 'error: optim.lr=nan must be a finite number > 0'),
    (['--config.train.batch_size=0'], 'error: train.batch_size=0 must be a finite number >= 1'),
    (['--config.optim.eps=-1e-8'], 'error: optim.eps=-1e-08 must be a finite number >= 0'),
])
def test_misspelled_or_impossible_values_are_one_readable_line(tmp_path, args, line):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path / "run"}', *args)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith(line), result.stderr
  assert not (tmp_path / 'run').exists()


def test_integer_fields_take_float_notation(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.train.steps=1e1',
                   '--config.train.eval_every=0', '--config.train.log_every=5')
  assert result.returncode == 0, result.stderr
  assert json.load(open(tmp_path / 'DONE'))['step'] == 10


def test_divergence_exits_3_with_one_line_naming_the_step(tmp_path):
  """lr=1e30: the first update makes params of ~1e30 and the next loss is not finite."""
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.optim.lr=1e30',
                   '--config.optim.warmup_steps=0', '--config.train.steps=10',
                   '--config.train.checkpoint_every=100', '--config.train.eval_every=0')
  assert result.returncode == 3, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: loss, gradient or new state is not finite at step ')
  assert 'train.on_nan=stop' in lines[0] and 'there is no checkpoint yet' in lines[0]
  assert not (tmp_path / 'DONE').exists()


def test_a_failed_start_leaves_the_workdir_fresh(tmp_path):
  bad = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.model.seq_len=2000000')
  assert bad.returncode == 2
  good = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.train.steps=5')
  assert good.returncode == 0, good.stderr
  assert 'fresh: no checkpoint' in good.stdout


def test_start_up_block_comes_before_the_first_step(tmp_path):
  result = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.train.steps=6')
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for needle in ('workdir: ', 'fresh: no checkpoint', 'mesh: data=', ' parameters',
                 'data: train: 1,003,854 tokens', 'steps: 6 x batch 8'):
    assert needle in out
  assert out.index('data: train') < out.index('step 1/6')  # Progress from the first step.


def test_eval_starts_from_the_saved_config(tmp_path):
  trained = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--config.train.steps=8',
                    '--config.model.d_model=16', '--config.train.eval_every=0')
  assert trained.returncode == 0, trained.stderr
  result = lm_main(f'--workdir={tmp_path}', '--mode=eval')  # No --config, no overrides.
  assert result.returncode == 0, result.stderr
  assert 'resuming' not in result.stdout and 'changed config' not in result.stdout
  row = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])
  assert row['step'] == 8 and 'eval/loss' in row
  # An override still applies on top of the saved config.
  other = lm_main(f'--config={TINY}', f'--workdir={tmp_path}', '--mode=eval',
                  '--config.train.eval_batches=1')
  assert other.returncode == 0, other.stderr


@pytest.mark.parametrize('make,needle', [
    (lambda p: p.write_text('x'), 'is a file'),
    (lambda p: (p.parent / 'f').write_text('x'), 'which is a file'),
])
def test_workdir_that_is_or_is_under_a_file_is_refused_before_loading(tmp_path, make, needle):
  workdir = tmp_path / 'run'
  make(workdir)
  target = workdir if needle == 'is a file' else tmp_path / 'f' / 'run'
  result = lm_main(f'--config={TINY}', f'--workdir={target}')
  assert result.returncode == 2 and needle in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def read_only_dir(tmp_path):
  """A read-only bind mount of tmp_path/ro (root only; otherwise skip)."""
  ro = tmp_path / 'ro'
  ro.mkdir()
  if subprocess.run(['mount', '--bind', str(ro), str(ro)], capture_output=True).returncode:
    pytest.skip('needs root to make a read-only bind mount')
  subprocess.run(['mount', '-o', 'remount,bind,ro', str(ro)], check=True)
  yield ro
  subprocess.run(['umount', '-l', str(ro)], check=False)


def test_read_only_workdir(tmp_path, read_only_dir):
  result = lm_main(f'--config={TINY}', f'--workdir={read_only_dir / "run"}')
  assert result.returncode == 2 and 'not writable' in result.stderr, result.stderr
  # A finished run on a read-only filesystem still evaluates: printed, not appended.
  trained = tmp_path / 'trained'
  assert lm_main(f'--config={TINY}', f'--workdir={trained}',
                 '--config.train.steps=5').returncode == 0
  subprocess.run(['umount', '-l', str(read_only_dir)], check=True)
  subprocess.run(['cp', '-a', str(trained), str(read_only_dir / 'run')], check=True)
  subprocess.run(['mount', '--bind', str(read_only_dir), str(read_only_dir)], check=True)
  subprocess.run(['mount', '-o', 'remount,bind,ro', str(read_only_dir)], check=True)
  result = lm_main(f'--workdir={read_only_dir / "run"}', '--mode=eval')
  assert result.returncode == 0, result.stderr
  assert 'not writable' in result.stdout and '"eval/loss"' in result.stdout


def test_a_run_imports_orbax_and_tfds_only_when_it_uses_them():
  # orbax (with tensorstore) is 24 MiB of the process; imported up front it sits under the
  # step's compile peak. lm.checkpoint imports it at first use: in a run, when the trainer
  # opens its checkpoint manager after the compile.
  result = subprocess.run(
      [sys.executable, '-c', 'import sys, lm.main, lm.train, lm.distill, lm.transfer; '
       'print(sorted({m.split(".")[0] for m in sys.modules} & {"orbax", "tensorstore", '
       '"tensorflow_datasets", "tensorflow"}))'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == '[]', result.stdout + result.stderr
