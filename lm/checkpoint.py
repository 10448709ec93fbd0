"""Orbax checkpoints of the train state: async, atomic, resharded on restore.

Orbax writes each step into a temporary directory and renames it when complete, so a step
directory that exists is whole; a half-written one (killed mid-save) is never listed.

One writer, any number of readers: the training run opens `manager()`, which creates the
directory and removes half-written saves; everything else (`lm.sample`, `--mode=eval`, a
launcher naming the step to resume from) opens `reader()` or calls `latest_step()`, which
never create, delete or write anything, so reading a run while it trains cannot break it.
"""

from __future__ import annotations  # Annotations name ocp's classes without importing it.

import contextlib
import importlib
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from lm.config import ConfigError


class _Orbax:
  """orbax.checkpoint, imported at first use: a fresh run first needs it at its first save,
  so its 25 MiB are not resident while the train step compiles (the run's memory peak)."""

  def __getattr__(self, name):
    return getattr(importlib.import_module('orbax.checkpoint'), name)


ocp = _Orbax()


def _directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, keep: int = 3, read_only: bool = False,
            handler=None) -> ocp.CheckpointManager:
  """The training run's manager, or with `read_only` a reader's (see `reader`).

  `handler` defaults to orbax's StandardCheckpointHandler; a PyTreeCheckpointHandler reads
  the same files and can restore part of the tree (lm.transfer reads only the weights).
  """
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
                               item_handlers=handler or ocp.StandardCheckpointHandler())


def reader(workdir: str, handler=None) -> ocp.CheckpointManager:
  """A manager that only reads: safe to open while another process trains in `workdir`."""
  return manager(workdir, read_only=True, handler=handler)


def saved_weights(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, str]:
  """The metadata tree of checkpoint `step`, and which of its entries holds the weights to
  reuse: the EMA when the run kept one, else the parameters."""
  meta = mngr.item_metadata(step)
  meta = getattr(meta, 'tree', meta)
  return meta, 'ema_params' if meta.get('ema_params') is not None else 'params'


def restore_part(mngr: ocp.CheckpointManager, step: int, item: dict) -> dict:
  """Only the entries of `item` (abstract arrays carrying their target shardings) from
  checkpoint `step` of a reader opened with the PyTree handler."""
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
  return mngr.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


# What orbax raises when a step directory it listed is gone by the time it reads the step's
# metadata: FileNotFoundError, or NotADirectoryError ("Path is not a directory").
_VANISHED = (FileNotFoundError, NotADirectoryError)


def _kept_changing(directory: str) -> ConfigError:
  return ConfigError(f'the checkpoints in {directory} kept changing while being read; try again')


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step, listed as orbax lists them; opens no manager."""
  directory = _directory(workdir)
  if not os.path.isdir(directory):
    return None
  for _ in range(20):  # A step the run deletes while this lists them: list again.
    try:
      meta = ocp.path.step.latest_step_metadata(directory, ocp.path.step.standard_name_format())
      return None if meta is None else meta.step
    except _VANISHED:
      continue
  raise _kept_changing(directory)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state))


def _cannot_restore(mngr: ocp.CheckpointManager, step: int, error: Exception,
                    then: str) -> ConfigError:
  """One line for a checkpoint orbax or tensorstore fails to read: which, why, what to do."""
  directory = str(mngr.directory)
  earlier = [s for s in mngr.all_steps() if s < step]
  # Orbax wraps tensorstore's error (which names the file and what is wrong with it) in one
  # that prints a whole TensorStore spec: report the innermost.
  seen = {id(error)}
  while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
    error = inner
    seen.add(id(error))
  reason = (str(error).strip().splitlines() or [''])[0][:200]
  fix = (f'{then} checkpoint {max(earlier)}' if earlier else
         'train again: it is the only checkpoint')
  return ConfigError(
      f'checkpoint {directory}/{step} cannot be restored ({type(error).__name__}: {reason}); '
      f'it is corrupt or incomplete: move it away (mv {directory}/{step} '
      f'{os.path.dirname(directory)}/corrupt-{step}) and {fix}')


def _is_abandoned_read(unraisable) -> bool:
  """An error orbax could no longer report: a read it gave up on after another one failed."""
  code = getattr(unraisable.object, 'cr_code', None)
  return ('Event loop is closed' in str(unraisable.exc_value) or
          (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename))


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Keeps one failed restore to one error.

  When one array fails to read, orbax abandons the others, but tensorstore finishes them on
  its threads into an event loop orbax has closed; Python then prints each as an unraisable
  exception, dozens of tracebacks around the one error that matters, for a while after the
  restore has raised. So after a failure those (and only those) stay silenced.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    raise  # The hook stays: the abandoned reads report after this.
  sys.unraisablehook = previous


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state,
            then: str = 'run the same command to resume from'):
  """Restores into `abstract_state`'s shardings, whatever mesh the checkpoint was written on.

  Any failure to read it (a data file deleted or truncated, garbage in it, a tree that does
  not match) is a ConfigError naming the checkpoint and the one before it.
  """
  try:
    with _quiet_abandoned_reads():
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and tensorstore raise ValueError, OSError, RuntimeError and bare Exception.
    raise _cannot_restore(mngr, step, e, then) from e


def _on_default_device(mngr: ocp.CheckpointManager, step: int):
  """The checkpoint's own tree, every array on the default device."""
  meta = mngr.item_metadata(step)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
      is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))


def restore_latest(workdir: str, abstract_state=None, then: str = 'run again to use'):
  """(step, state) of the latest complete checkpoint in `workdir`, read-only.

  For every reader: `lm.sample` and `--mode=eval`. Into `abstract_state`'s shardings, or, if
  None, the tree as saved on the default device. A run training in `workdir` at the same
  time may delete the step being read (keep_checkpoints) once it has saved newer ones; then
  the newest is read instead, so only a checkpoint that stays the latest is called corrupt.
  """
  for _ in range(20):  # Each retry follows a step the run deleted mid-read: it saved a newer.
    try:
      mngr = reader(workdir)
    except _VANISHED:  # A step deleted while the manager listed the directory.
      continue
    try:
      try:
        step = mngr.latest_step()
      except _VANISHED:
        continue
      if step is None:
        raise ConfigError(f'no checkpoint in {mngr.directory}: train there first '
                          '(python -m lm.main --config=... --workdir=...)')
      try:
        with _quiet_abandoned_reads():
          abstract = abstract_state
          if abstract is None:
            abstract = _on_default_device(mngr, step)
          return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        if latest_step(workdir) == step:
          raise _cannot_restore(mngr, step, e, then) from e
    finally:
      mngr.close()
  raise _kept_changing(_directory(workdir))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'no config.json in {workdir!r}: train there first '
                      '(python -m lm.main --config=... --workdir=...)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_for_inference(workdir: str):
  """(config, params) of the latest checkpoint in `workdir`, on the default device; read-only."""
  config = load_config(workdir)
  _, state = restore_latest(workdir)
  params = state['ema_params'] if state.get('ema_params') is not None else state['params']
  return config, jax.tree.map(np.asarray, params)
