"""Entry point: `python -m lm.main --config=experiments/<name>.py --workdir=<dir>`.

Trains (resuming from the workdir's latest checkpoint), evaluates (`--mode=eval`, starting from
the workdir's saved config.json with the command line's overrides on top), or prints the plan
without training (`--dry_run`). `--help` lists the flags, `--config_help` every config field.
Bad input exits with code 2 and one line on stderr; divergence exits with 3.
"""

import fcntl
import json
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from lm import cli
from lm import runtime
from lm.config import ConfigError, num_processes, split_cpu_devices

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file (get_config()).',
                                          lock_config=True)
_WORKDIR = cli.WORKDIR
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train, or evaluate the latest '
                          'checkpoint on data.eval_split (and data.test_split).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the mesh, shardings, memory and FLOPs '
                             'plan, then exit without training.')
_PLAN_DEVICE = flags.DEFINE_string('plan_device', '', '--dry_run: predict the step time on '
                                   'this device kind (e.g. H100, "TPU v5p"); default: this one.')
_PLAN_DATA = flags.DEFINE_bool('plan_data', False, '--dry_run: read the dataset for the exact '
                               'vocab and epoch size instead of planning from the config.')

_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.py')
_USAGE = """usage: python -m lm.main --config=experiments/<name>.py --workdir=<dir> [flags]
       [--config.<section>.<field>=<value> ...]

flags:
  --config       experiment file with get_config() (optional with --mode=eval: the workdir's
                 saved config.json is used)
  --workdir      run directory: checkpoints, metrics.jsonl, config.json; the same command
                 resumes from its latest checkpoint
  --mode         train (default) or eval: the latest checkpoint on data.eval_split (and
                 data.test_split), appended to metrics.jsonl
  --dry_run      print mesh, shardings, memory and FLOPs plan; train nothing, read no data
  --plan_device  with --dry_run: predict the step time on this device (H100, "TPU v5p", ...)
  --plan_data    with --dry_run: read the dataset (exact char vocab, epoch size); without it
                 the plan needs no data, only the config and dataset metadata
  --config_help  list every config field with its default and meaning
  --help         this message
"""


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


def _check_workdir(workdir: str, writing: bool) -> None:
  """Before any data loads: a workdir that is a file, under a file, or not writable."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    _fail(f'--workdir {workdir!r} is a file, not a directory; pick another --workdir')
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    _fail(f'--workdir {workdir!r} is under {parent!r}, which is a file; pick another --workdir')
  if writing and not os.access(parent, os.W_OK | os.X_OK):
    _fail(f'--workdir {workdir!r} is not writable ({parent!r} is read-only to this user); '
          'pick a writable --workdir')


def _lock_workdir(workdir: str):
  """Holds an exclusive lock on the workdir for the life of the process."""
  try:
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, '.lock'), 'w')
  except OSError as e:
    _fail(f'cannot write into --workdir {workdir!r} ({e.strerror}); pick a writable --workdir')
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    _fail(f'another run is using workdir {workdir!r} (it holds {workdir}/.lock); '
          'wait for it to finish or pick another --workdir')
  handle.write(str(os.getpid()))
  handle.flush()
  return handle


def _flag_value(argv, name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overridden(argv) -> set[str]:
  """Dotted config fields the command line sets (--config.train.steps=5 -> 'train.steps')."""
  return {arg[len('--config.'):].split('=', 1)[0] for arg in argv
          if arg.startswith('--config.')}


def _integral_floats(argv) -> list[str]:
  """--config.x=1e3 -> --config.x=1000: an integer written in float notation is an integer."""
  out = []
  for arg in argv:
    m = re.fullmatch(r'(--config\.[\w.]+=)([-+]?\d+(?:\.\d*)?[eE][+]?\d+)', arg)
    if m and float(m.group(2)).is_integer():
      arg = m.group(1) + str(int(float(m.group(2))))
    out.append(arg)
  return out


def _readable(error: Exception) -> str:
  """absl's and ml_collections' multi-line errors as one line that names the fix."""
  text = str(error)
  m = re.search(r"'\\?'?(\w+)\\?'?'?\s*Did you mean \"(\w+)\" instead of \"(\w+)\"", text)
  m = m or re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  if m:
    good, bad = m.groups()[-2:]
    return f'no config field {bad!r}; did you mean {good!r}? (see --config_help)'
  m = re.search(r"Unknown command line flag '([\w.]+)'(?:\. Did you mean: ([\w.]+) \?)?", text)
  if m:
    hint = f'; did you mean --{m.group(2)}?' if m.group(2) else ''
    return f'no flag --{m.group(1)}{hint} (see --help)'
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return ' '.join(lines)[:300] if lines else type(error).__name__


def _saved_config(workdir: str):
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _overlay(config, saved: dict, keep: set[str], prefix: str = '') -> None:
  """config <- the saved values, except the fields the command line set (`keep`)."""
  for key, value in saved.items():
    name = prefix + key
    if key not in config:
      continue  # A field this version no longer has.
    if isinstance(value, dict):
      _overlay(config[key], value, keep, name + '.')
    elif name not in keep:
      if name == 'model.remat' and isinstance(value, bool):  # A bool before remat policies.
        value = 'full' if value else 'none'
      with config.unlocked():
        current = config[key]
        config[key] = tuple(value) if isinstance(current, tuple) and value is not None else value


def _config_help() -> str:
  """Every field of lm/config.py's get_config(), its default and its comment."""
  rows, pending = [], []
  with open(_BASE_CONFIG) as f:
    source = f.read()
  body = source[source.index('def get_config()'):source.index('  c.lock()')]
  for line in body.splitlines():
    m = re.match(r'\s+c\.([\w.]+) = (.+?)\s*(?:#\s*(.*))?$', line)
    if line.strip().startswith('#'):
      pending.append(line.strip()[1:].strip())
    elif m and 'ConfigDict()' not in m.group(2):
      comment = ' '.join(pending + [m.group(3) or '']).strip()
      rows.append((m.group(1), m.group(2), comment))
      pending = []
  width = max(len(f'{k} = {v}') for k, v, _ in rows)
  return '\n'.join(f'{k + " = " + v:<{width}}  {c}' for k, v, c in rows)


def run(argv) -> int:
  if any(a in ('--help', '-h', '--helpfull', '-?') for a in argv[1:]):
    print(_USAGE)
    return 0
  if '--config_help' in argv[1:]:
    print(_config_help())
    return 0
  argv = _integral_floats(argv)
  path = _flag_value(argv, 'config')
  workdir = _flag_value(argv, 'workdir')
  eval_mode = _flag_value(argv, 'mode') == 'eval'
  saved = _saved_config(workdir) if workdir and eval_mode else None
  if path is None and saved is not None:
    argv = [argv[0], f'--config={_BASE_CONFIG}', *argv[1:]]  # Eval from config.json alone.
  elif path and not os.path.isfile(path):
    _fail(f'config file {path!r} does not exist; pass --config=experiments/<name>.py')
  try:
    FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_readable(e))
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=experiments/quickstart.py (see --help)')
  if not _WORKDIR.value:
    _fail('--workdir is required, e.g. --workdir=/tmp/run (see --help)')
  config, workdir = _CONFIG.value, _WORKDIR.value
  if saved is not None:
    _overlay(config, saved, _overridden(argv))
  if not _DRY_RUN.value:
    _check_workdir(workdir, writing=_MODE.value == 'train')
  runtime.set_gpu_xla_flags()  # Before anything starts a backend.
  try:
    split_cpu_devices(config)
  except ConfigError as e:
    _fail(str(e))
  stop = None
  from lm import train  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'train' and not _DRY_RUN.value:
    stop = train.StopFlag()  # Before anything slow, so a SIGTERM during set-up is honoured.
  _maybe_initialize_distributed()
  if stop is not None:
    stop.install()  # Back from jax.distributed's preemption notifier.
  import jax  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache()
  lock = None
  try:
    if _DRY_RUN.value:
      from lm import plan  # pylint: disable=g-import-not-at-top
      plan.print_plan(config, _PLAN_DEVICE.value, read_data=_PLAN_DATA.value)
      return 0
    if _MODE.value == 'eval':
      result = train.Trainer(config, workdir, read_only=True,
                             training=False).evaluate_latest()
    else:
      trainer = train.Trainer(config, workdir)  # Validates everything; writes nothing.
      if jax.process_index() == 0:
        lock = _lock_workdir(workdir)
      result = trainer.run(stop=stop)
    if jax.process_index() == 0:
      print(json.dumps(result, sort_keys=True), flush=True)
  except ConfigError as e:
    _fail(str(e))
  except train.Diverged as e:
    _fail(str(e), code=3)
  except KeyboardInterrupt:
    from lm import checkpoint  # pylint: disable=g-import-not-at-top
    _fail(f'interrupted by a second signal without saving; the latest complete checkpoint is '
          f'step {checkpoint.latest_step(workdir)}. Run the same command to resume', code=130)
  finally:
    if lock is not None:
      lock.close()
    if stop is not None:
      stop.exiting()
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == '__main__':
  main()
