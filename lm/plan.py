"""`--dry_run`: what a run would do on this device set, without training.

Prints the mesh, the parameter count, every parameter's sharding, per-device memory for
params, optimizer state and activations (from the compiled step), FLOPs per step, and the
step time that implies on a target device at a given MFU.

It needs no dataset: the task takes its shapes from the config and dataset metadata
(lm/shapes.py) and says what it had to assume; `read_data=True` (--plan_data) loads the data.
"""

import re

import jax
import numpy as np

from lm import metrics as metrics_lib
from lm import shapes
from lm import sharding
from lm import train

_MIB = 2**20


def _per_device_bytes(abstract_tree) -> int:
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shard)) * x.dtype.itemsize
  return total


def print_plan(config, target_device: str = '', assumed_mfu: float = 0.4,
               read_data: bool = False) -> dict:
  peak = _peak_for(target_device)  # Before the compile: a misspelt device is an instant error.
  trainer = train.Trainer(config, workdir='/nonexistent-dry-run',  # Validates; writes nothing.
                          shapes_only=not read_data)
  mesh, state, task = trainer.mesh, trainer.abstract_state, trainer.task
  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} '
        f'({jax.process_count()} processes)')
  print('mesh: ' + ', '.join(f'{k}={v}' for k, v in mesh.shape.items()))
  stand_in = isinstance(task.data, shapes.Shapes)
  for line in task.data.describe() if stand_in else task.describe():
    print(f'data: {line}')
  print(f'parameters: {trainer.param_count:,}')
  print(f'\n{"parameter":<48} {"shape":<20} sharding')
  rows = sharding.describe(trainer.state_shardings.params, state.params)
  for path, shape, spec in sorted(rows, key=lambda row: _natural(row[0])):
    print(f'{path:<48} {str(shape):<20} {spec}')

  compiled = trainer.train_step.lower(state, trainer.abstract_batch()).compile()
  memory = compiled.memory_analysis()
  temp = getattr(memory, 'temp_size_in_bytes', 0) if memory is not None else 0
  params_b = _per_device_bytes(state.params)
  opt_b = _per_device_bytes(state.opt_state)
  flops = task.flops_per_step(
      {'params': jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.params),
       **jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.model_state)},
      trainer.example)
  print(f'\nper device: params {params_b / _MIB:,.1f} MiB, optimizer state '
        f'{opt_b / _MIB:,.1f} MiB, activations and temporaries {temp / _MIB:,.1f} MiB '
        '(from the compiled step)')
  print(f'FLOPs per step: {flops:.3e} ({task.items_per_step:,} {task.unit} per step)')
  step_s = flops / (peak * jax.device_count() * assumed_mfu)
  total = (f'{trainer.steps:,} steps: {trainer.steps * step_s / 3600:,.2f} h' if trainer.steps
           else f'steps unknown: train.epochs={config.train.epochs:g} of data whose size '
                'the plan did not read (--plan_data reads it)')
  print(f'predicted step time on {jax.device_count()} x {target_device or "this device"} '
        f'at {assumed_mfu:.0%} MFU: {step_s * 1e3:,.1f} ms '
        f'({task.items_per_step / step_s:,.0f} {task.unit}/s); {total}')
  return {'params': trainer.param_count, 'flops_per_step': flops, 'step_s': step_s,
          'param_bytes_per_device': params_b, 'opt_bytes_per_device': opt_b,
          'temp_bytes_per_device': temp, 'assumed_mfu': assumed_mfu,
          'steps': trainer.steps}


def _natural(path: str) -> list:
  """'block_10/mlp' after 'block_9/mlp': digit runs compare as numbers."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', path)]


def _peak_for(target_device: str) -> float:
  if not target_device:
    return metrics_lib.peak_flops_per_device()
  for name, flops in metrics_lib.PEAK_FLOPS:
    if name.lower() in target_device.lower() or target_device.lower() in name.lower():
      return flops
  names = ', '.join(n for n, _ in metrics_lib.PEAK_FLOPS)
  raise train.ConfigError(f'--plan_device={target_device!r} is not in the peak table; '
                          f'use one of: {names}')
