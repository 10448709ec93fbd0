"""Orbax checkpoints of the train state: async, atomic, resharded on restore.

Orbax writes each step into a temporary directory and renames it when complete, so a step
directory that exists is whole; a half-written one (killed mid-save) is never listed.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm.config import ConfigError


def _directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The training run's manager, or with `read_only` a reader's (see `reader`)."""
  if read_only:
    # Orbax's defaults write on open: `create` makes the directory, `cleanup_tmp_directories`
    # deletes the save the trainer has in flight (it killed a run that was being sampled).
    # read_only also turns off save and delete; no root metadata means no file and no
    # cross-process barrier on open.
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                           cleanup_tmp_directories=False,
                                           save_root_metadata=False,
                                           enable_async_checkpointing=False)
  else:
    # cleanup_tmp_directories: a save killed half-way leaves a temporary directory, which is
    # never read as a checkpoint and is removed when the next run opens the manager. Only
    # the one run that holds the workdir lock may do that.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=True)
  # The handler named up front lets item_metadata() read a checkpoint's tree before any
  # restore, which restoring onto a different device count (sampling on one device what
  # training wrote on several) needs.
  return ocp.CheckpointManager(_directory(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def reader(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads: safe to open while another process trains in `workdir`."""
  return manager(workdir, read_only=True)


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step, listed as orbax lists them; opens no manager."""
  directory = _directory(workdir)
  if not os.path.isdir(directory):
    return None
  meta = ocp.path.step.latest_step_metadata(directory, ocp.path.step.standard_name_format())
  return None if meta is None else meta.step


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores into `abstract_state`'s shardings, whatever mesh the checkpoint was written on."""
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise ConfigError(f'checkpoint {mngr.directory}/{step} cannot be restored '
                      f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                      'move it away to resume from an earlier one') from e


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'no config.json in {workdir!r}: train there first '
                      '(python -m lm.main --config=... --workdir=...)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_for_inference(workdir: str):
  """(config, params) of the latest checkpoint in `workdir`, on the default device."""
  config = load_config(workdir)
  mngr = manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise ConfigError(f'no checkpoint in {workdir!r}/checkpoints: train there first')
  meta = mngr.item_metadata(step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
  try:
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, OSError) as e:
    raise ConfigError(f'checkpoint {mngr.directory}/{step} cannot be restored '
                      f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                      'it may be corrupt') from e
  mngr.close()
  params = state['ema_params'] if state.get('ema_params') is not None else state['params']
  return config, jax.tree.map(np.asarray, params)
