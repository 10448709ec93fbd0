"""Building blocks for `sweep()` in experiment files: plain lists of override dicts.

A trial is a dict from dotted config path to value; a sweep is a list of trials. Pieces
compose with `product` (every combination) and `+` (one list after the other):

  def sweep():
    return sweeps.product(
        sweeps.loguniform('optim.lr', 1e-4, 1e-2, n=8, seed=0),
        sweeps.grid(seed=[0, 1]))

Dotted names do not fit Python keywords, so every function also takes a dict first:
`grid({'optim.lr': [1e-3, 3e-3]}, seed=[0])`.
"""

import itertools
import math
import random


def _axes(axes: dict | None, kwargs: dict) -> dict:
  merged = dict(axes or {})
  for name in kwargs:
    if name in merged:
      raise ValueError(f'{name!r} is given twice')
  merged.update(kwargs)
  for name, values in merged.items():
    if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__'):
      raise ValueError(f'{name!r} needs a list of values, got {values!r}')
  return {name: list(values) for name, values in merged.items()}


def _merge(*trials: dict) -> dict:
  out = {}
  for trial in trials:
    clash = set(out) & set(trial)
    if clash:
      raise ValueError(f'{sorted(clash)} set by two parts of the sweep')
    out.update(trial)
  return out


def grid(axes: dict | None = None, **kwargs) -> list[dict]:
  """Every combination; the last axis varies fastest."""
  merged = _axes(axes, kwargs)
  names = list(merged)
  return [dict(zip(names, values)) for values in itertools.product(*merged.values())]


def zipped(axes: dict | None = None, **kwargs) -> list[dict]:
  """Axes of equal length, taken side by side: the i-th trial has the i-th value of each."""
  merged = _axes(axes, kwargs)
  lengths = {name: len(values) for name, values in merged.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'zipped axes differ in length: {lengths}')
  names = list(merged)
  return [dict(zip(names, values)) for values in zip(*merged.values())]


def zip_(*sweeps: list[dict]) -> list[dict]:
  """Sweeps of equal length, merged trial by trial."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f'zip_ of sweeps with different lengths: {lengths}')
  return [_merge(*trials) for trials in zip(*sweeps)]


def product(*sweeps: list[dict]) -> list[dict]:
  """Every combination of one trial from each sweep, merged."""
  return [_merge(*trials) for trials in itertools.product(*sweeps)]


def loguniform(name: str, low: float, high: float, n: int, seed: int,
               digits: int = 3) -> list[dict]:
  """n log-uniform draws in [low, high], the same for the same seed on every machine.

  Values are rounded to `digits` significant digits so trial names stay readable.
  """
  if not 0 < low < high:
    raise ValueError(f'loguniform({name!r}) needs 0 < low < high, got {low}, {high}')
  rng = random.Random(seed)  # Python's Mersenne Twister: stable across versions and hosts.
  draws = (math.exp(rng.uniform(math.log(low), math.log(high))) for _ in range(n))
  return [{name: float(f'{v:.{digits}g}')} for v in draws]
