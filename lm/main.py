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

from lm.config import ConfigError, num_processes, split_cpu_devices

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


def _maybe_initialize_distributed():
  if num_processes() == 1:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only CPU collectives.
  if int(os.environ.get('LM_NUM_PROCESSES', '1')) > 1:  # launch.local
    jax.distributed.initialize(
        coordinator_address=os.environ['LM_COORDINATOR'],
        num_processes=int(os.environ['LM_NUM_PROCESSES']),
        process_id=int(os.environ['LM_PROCESS_ID']))
  else:
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
    split_cpu_devices(config)
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
