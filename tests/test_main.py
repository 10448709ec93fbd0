"""The command line: bad input is one line on stderr, exit code 2, and nothing written."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'tiny_config.py')


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
