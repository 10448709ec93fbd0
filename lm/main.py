"""Entry point: `python -m lm.main --config=experiments/<name>.py --workdir=<dir>`.

Trains (resuming from the workdir's latest checkpoint), evaluates (`--mode=eval`), or prints
the plan without training (`--dry_run`). Bad input exits with code 2 and one line on stderr.
"""

import fcntl
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from lm.config import ConfigError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file (get_config()).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and logs go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train, or evaluate the latest '
                          'checkpoint on data.eval_split (and data.test_split).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the mesh, shardings, memory and FLOPs '
                             'plan, then exit without training.')
_PLAN_DEVICE = flags.DEFINE_string('plan_device', '', '--dry_run: predict the step time on '
                                   'this device kind (e.g. H100, "TPU v5p"); default: this one.')


def _fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _cpu_device_count(config) -> int:
  """How many XLA devices a CPU-only host is split into for this config.

  A fixed mesh larger than one device gets that many (so it also runs on a laptop). A mesh
  left to fill (-1) gets one device per core when the batch divides, unless
  `mesh.cpu_devices` says otherwise; several processes on one host keep one device each.
  """
  mesh, train = config.mesh, config.train
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  fixed = 1
  for s in sizes:
    fixed *= max(s, 1)
  if -1 not in sizes or _num_processes() > 1:
    return fixed
  if mesh.cpu_devices < 0:
    raise ConfigError(f'mesh.cpu_devices={mesh.cpu_devices} must be >= 0 (0 = one per core)')
  if mesh.cpu_devices:
    return mesh.cpu_devices
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  eval_batch = config.data.get('eval_batch_size', 0) or train.batch_size
  for n in range(max(cores, 1), 0, -1):
    shards = n // max(mesh.tensor, 1)  # Devices that split the batch.
    if (n % fixed == 0 and train.batch_size % (shards * train.grad_accum_steps) == 0
        and eval_batch % shards == 0):
      return n
  return fixed


def _num_processes() -> int:
  return max(int(os.environ.get('LM_NUM_PROCESSES', '1')),
             int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1'))))


def _split_cpu(config):
  """Sets the CPU device count before JAX starts; an explicit XLA_FLAGS count wins.

  Only the CPU backend reads this flag, so accelerators are unaffected.
  """
  xla_flags = os.environ.get('XLA_FLAGS', '')
  count = _cpu_device_count(config)
  if count > 1 and 'xla_force_host_platform_device_count' not in xla_flags:
    os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={count}'


def _maybe_initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if int(os.environ.get('LM_NUM_PROCESSES', '1')) > 1:
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ['LM_COORDINATOR'],
        num_processes=int(os.environ['LM_NUM_PROCESSES']),
        process_id=int(os.environ['LM_PROCESS_ID']))
  elif int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', '1'))) > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize()  # Reads the Slurm environment.


def _lock_workdir(workdir: str):
  """Holds an exclusive lock on the workdir for the life of the process."""
  os.makedirs(workdir, exist_ok=True)
  handle = open(os.path.join(workdir, '.lock'), 'w')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    _fail(f'another run is using workdir {workdir!r} (it holds {workdir}/.lock); '
          'wait for it to finish or pick another --workdir')
  handle.write(str(os.getpid()))
  handle.flush()
  return handle


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def run(argv) -> int:
  path = _config_path(argv)
  if path and not os.path.isfile(path):
    _fail(f'config file {path!r} does not exist; pass --config=experiments/<name>.py')
  try:
    FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections report bad overrides with multi-line messages; keep the point.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(lines[0] if lines else type(e).__name__)
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=experiments/quickstart.py')
  if not _WORKDIR.value:
    _fail('--workdir is required, e.g. --workdir=/tmp/run')
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    _split_cpu(config)
  except ConfigError as e:
    _fail(str(e))
  _maybe_initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from lm import train  # pylint: disable=g-import-not-at-top
  lock = None
  try:
    if _DRY_RUN.value:
      from lm import plan  # pylint: disable=g-import-not-at-top
      plan.print_plan(config, _PLAN_DEVICE.value)
      return 0
    trainer = train.Trainer(config, workdir)  # Validates everything; writes nothing.
    if _MODE.value == 'eval':
      result = trainer.evaluate_latest()
    else:
      if jax.process_index() == 0:
        lock = _lock_workdir(workdir)
      result = trainer.run()
    if jax.process_index() == 0:
      print(json.dumps(result, sort_keys=True), flush=True)
  except ConfigError as e:
    _fail(str(e))
  except train.Diverged as e:
    _fail(str(e), code=3)
  finally:
    if lock is not None:
      lock.close()
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == '__main__':
  main()
