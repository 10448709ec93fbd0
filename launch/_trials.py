"""A sweep's trials: read from the experiment file, named, written to `<sweep_dir>/sweep.json`.

Trial names depend only on the trial's index and overrides, so a restarted sweep finds the
same workdirs and the trials in them continue (or are skipped when DONE).
"""

import json
import os
import re

from launch._cli import UsageError
from lm import config as config_lib
from lm import sweeps

SPEC_FILE = 'sweep.json'
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')
_MAX_NAME = 120


def _module(config_path: str):
  try:
    return config_lib.experiment_module(config_path)
  except config_lib.ConfigError as e:
    raise UsageError(str(e)) from None


def load_sweep(config_path: str) -> list[dict]:
  """The experiment file's `sweep()`, checked against its `get_config()`."""
  module = _module(config_path)
  if not callable(getattr(module, 'sweep', None)):
    raise UsageError(f'{config_path} has no sweep(); add one beside get_config() returning a '
                     "list of overrides, e.g. [{'optim.lr': 1e-3}, {'optim.lr': 3e-3}], or "
                     'give the axes with --grid optim.lr=1e-3,3e-3 --grid seed=0,1')
  trials = module.sweep()
  if not isinstance(trials, list) or not trials or not all(isinstance(t, dict) for t in trials):
    raise UsageError(f'{config_path}: sweep() must return a non-empty list of dicts')
  config = module.get_config()
  for trial in trials:
    for key in trial:
      _field(config, key, f'{config_path}: sweep() sets')
  return trials


def grid_trials(config_path: str, axes: list[str]) -> list[dict]:
  """`--grid field=v1,v2` axes: every combination, each value typed as the field's default."""
  config = _module(config_path).get_config()
  values = {}
  for axis in axes:
    key, _, text = axis.partition('=')
    if not key or not text:
      raise UsageError(f'--grid {axis!r} needs FIELD=V1,V2,..., e.g. --grid optim.lr=1e-3,3e-3')
    if key in values:
      raise UsageError(f'--grid {key} is given twice; put all its values in one --grid')
    default = _field(config, key, '--grid names')
    values[key] = [_typed(key, v.strip(), default) for v in text.split(',')]
  return sweeps.grid(values)


def _typed(key: str, text: str, default):
  """`text` as a value of the field whose default is `default` (so 1e3 is an int for steps)."""
  if isinstance(default, bool):
    if text.lower() in ('true', 'false'):
      return text.lower() == 'true'
    raise UsageError(f'--grid {key}: {text!r} is not true or false')
  try:
    if isinstance(default, int):
      number = float(text)
      if not number.is_integer():
        raise ValueError
      return int(number)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    kind = 'an integer' if isinstance(default, int) else 'a number'
    raise UsageError(f'--grid {key}: {text!r} is not {kind}, as the field is') from None
  if isinstance(default, str):
    return text
  raise UsageError(f'--grid cannot set {key} (a {type(default).__name__}); sweep it in the '
                   "experiment file's sweep()")


def _field(config, key: str, what: str):
  """The default of config field `key` ('optim.lr'), or a UsageError starting with `what`."""
  node = config
  for part in str(key).split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      raise UsageError(f'{what} {key!r}, which is not a config field')
    node = node[part]
  return node


def format_value(value) -> str:
  """As absl's config flags parse it back: strings bare, everything else as a literal."""
  return value if isinstance(value, str) else repr(value)


def override_args(overrides: dict) -> list[str]:
  return [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]


def trial_name(index: int, overrides: dict, count: int) -> str:
  body = ','.join(f'{k}={format_value(v)}' for k, v in overrides.items())
  body = _UNSAFE.sub('_', body)[:_MAX_NAME]
  return f'{index:0{max(3, len(str(count - 1)))}d}_{body}'.rstrip('_')


def expand(config_path: str, sweep_dir: str, extra_args: list[str],
           grid: list[str] | None = None) -> dict:
  """The sweep as written to sweep.json: config, extra args and one entry per trial.

  `grid` ('field=v1,v2' axes, from --grid) replaces the experiment file's sweep().
  """
  for flag in ('--config=', '--workdir='):
    if any(a.startswith(flag) or a == flag[:-1] for a in extra_args):
      raise UsageError(f'{flag[:-1]} after -- is set by launch.sweep for each trial; remove it')
  trials = grid_trials(config_path, grid) if grid else load_sweep(config_path)
  swept = {k for t in trials for k in t}
  clash = sorted(k for k in swept if any(a.startswith(f'--config.{k}=') for a in extra_args))
  if clash:
    source = '--grid' if grid else 'sweep()'
    raise UsageError(f'{", ".join(clash)} is swept by {source} and also set after --; drop one')
  config_path, sweep_dir = os.path.abspath(config_path), os.path.abspath(sweep_dir)
  out = []
  for i, overrides in enumerate(trials):
    name = trial_name(i, overrides, len(trials))
    workdir = os.path.join(sweep_dir, name)
    out.append({'index': i, 'name': name, 'overrides': overrides, 'workdir': workdir,
                'args': [f'--config={config_path}', f'--workdir={workdir}', *extra_args,
                         *override_args(overrides)]})
  return {'config': config_path, 'extra_args': list(extra_args), 'trials': out}


def write(sweep_dir: str, spec: dict):
  """Writes sweep.json, or checks that the one already there describes the same sweep."""
  path = os.path.join(sweep_dir, SPEC_FILE)
  if os.path.exists(path):
    old = read(sweep_dir)
    if json.loads(json.dumps(spec)) != old:
      raise UsageError(f'{path} describes a different sweep (config, trials or args after --); '
                       'use a new --sweep_dir, or delete that file to start over')
    return
  os.makedirs(sweep_dir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(spec, f, indent=1)
  os.replace(path + '.tmp', path)  # A sweep killed mid-write leaves no half file.


def read(sweep_dir: str) -> dict:
  path = os.path.join(sweep_dir, SPEC_FILE)
  if not os.path.exists(path):
    raise UsageError(f'no {SPEC_FILE} in {sweep_dir!r}: start the sweep there first')
  with open(path) as f:
    return json.load(f)


def is_done(trial: dict) -> bool:
  return os.path.exists(os.path.join(trial['workdir'], 'DONE'))
