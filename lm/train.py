"""The training loop, shared by every task.

`Trainer(config, workdir)` builds the task (its data, model and loss: lm/tasks.py), the
optimizer and the sharded state, and `run()` trains: dispatch step N, then read step N-1's
metrics (no host sync per step), evaluate and checkpoint on schedule, stop cleanly on SIGTERM.
"""

import ctypes
import errno
import functools
import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from lm import batches
from lm import checkpoint
from lm import distill
from lm import metrics as metrics_lib
from lm import optim
from lm import prefetch
from lm import prune
from lm import quantize
from lm import sharding
from lm import steps as steps_lib
from lm import tasks
from lm import transfer
from lm import workdir as workdir_lib
from lm.config import ConfigError, check_values, to_json

# Fields that may change between a run and its resumption without `resume_mismatch=ignore`.
_RESUMABLE_CHANGES = ('train.steps', 'train.log_every', 'train.eval_every',
                      'train.eval_every_epochs', 'train.eval_batches',
                      'train.checkpoint_every', 'train.keep_checkpoints', 'train.profile',
                      'train.on_nan', 'train.max_rollbacks', 'data.data_dir',
                      'data.eval_split', 'data.test_split', 'mesh.', 'resume_mismatch',
                      'model.remat', 'model.attention', 'data.prefetch')


class Diverged(RuntimeError):
  """The loss or gradient went non-finite and config.train.on_nan says to stop."""


def _diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  keys = sorted(set(old) | set(new))
  out = []
  for k in keys:
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f'{prefix}{k}.')
    elif a != b and not (isinstance(a, list) and tuple(a) == b):
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


class Trainer:
  """Builds a task's run (mesh, data, model, optimizer, sharded state); `run()` trains.

  `read_only` (--mode=eval, benchmarks) never writes into the workdir, and opens its
  checkpoints without the clean-up a trainer does, so it may read a run that is training.
  `shapes_only` (--dry_run) builds everything a plan compiles without loading the data; then
  `steps` is None when it depends on a dataset size the plan does not know.
  """

  def __init__(self, config, workdir: str, devices=None, *, read_only: bool = False,
               shapes_only: bool = False, training: bool = True):
    self.config, self.workdir, self.read_only = config, workdir, read_only
    self.is_main = jax.process_index() == 0
    check_values(config)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    batches.check_batch(config.train.batch_size, jax.process_count(),
                        sharding.data_shards(self.mesh), config.train.grad_accum_steps)
    # The source run's model hyperparameters first: they are part of the config resumed.
    self.init_notes = transfer.adopt(config) if config.init.workdir else []
    quant = quantize.check(config, workdir, read_only)  # Before the drift check: says more.
    if not read_only:
      self._check_config_drift()
    self.task = tasks.build(config, workdir, training=training, shapes_only=shapes_only)
    # int8 or fake-quantized (QAT) matmuls: the same parameters, another forward pass.
    self.task.model = quantize.wrap_model(self.task.model, quant)
    self.steps = self.task.steps()
    self.eval_every = config.train.eval_every
    if config.train.eval_every_epochs > 0 and self.task.data.steps_per_epoch is not None:
      self.eval_every = max(1, round(config.train.eval_every_epochs *
                                     self.task.data.steps_per_epoch))
    # An unknown length (a plan) changes the schedule's values, not what the step compiles to.
    self.tx, schedule = optim.make(config.optim, self.steps or config.train.steps,
                                   config.model.num_layers)
    self.prune = prune.spec(config.prune, self.steps or config.train.steps)
    if (self.prune is not None or quant or config.quant.export) and config.model.scan_layers:
      raise ConfigError('pruning and int8 take each kernel as one layer, and model.scan_layers '
                        'stacks the blocks\' kernels into one; set model.scan_layers=False')
    self.tx = prune.wrap(self.tx, self.prune, config.train)  # Masks are optimizer state.
    self.lr = jax.jit(schedule)  # One compile, not one per jnp op of the schedule.
    self.example = self.task.example_batch()
    # A distillation teacher: fixed weights passed to the step as `frozen`, never in the state.
    self.teacher = None
    if config.distill.teacher_workdir and not read_only:
      self.teacher = distill.Teacher(config, self.task, self.mesh, self.example)
      self.init_notes += self.teacher.notes
    self.abstract_frozen = () if self.teacher is None else (self.teacher.abstract,)
    self.frozen = ()
    self.prefetch = prefetch.depth(config.data.prefetch, jax.default_backend())
    self._build_state_shardings()
    self._jit_steps()
    self._ckpt = None

  @property
  def ckpt(self):
    # Created on first use: validating a config must not write into the workdir.
    if self._ckpt is None:
      self._ckpt = checkpoint.manager(self.workdir, self.config.train.keep_checkpoints,
                                      read_only=self.read_only)
    return self._ckpt

  def has_checkpoint(self) -> bool:
    return checkpoint.latest_step(self.workdir) is not None

  def _write_workdir(self, fresh: bool):
    """config.json and the task's files, once the state exists: a start that fails before
    (bad data, a checkpoint that does not restore) leaves the workdir as it was."""
    if not self.is_main:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self.task.write_files(self.workdir)
    if fresh and os.path.exists(self._skipped_path()):
      os.remove(self._skipped_path())  # A previous run's rollbacks are not this run's.
    workdir_lib.write_atomic(os.path.join(self.workdir, 'config.json'), to_json(self.config))

  # --- set-up -------------------------------------------------------------------------------

  def _check_config_drift(self):
    """Resuming needs the config the checkpoints were trained with; a workdir without a
    checkpoint is fresh, whatever config.json a failed start left there."""
    path = os.path.join(self.workdir, 'config.json')
    if self.config.resume_mismatch == 'ignore' or checkpoint.latest_step(self.workdir) is None:
      return
    if not os.path.exists(path):
      raise ConfigError(f'{self.workdir} has checkpoints but no config.json to check this '
                        'config against; restore config.json, use a new --workdir, or pass '
                        '--config.resume_mismatch=ignore if this config is the one it ran with')
    with open(path) as f:
      old = json.load(f)
    changed = _diff(old, json.loads(to_json(self.config)))
    blocking = [c for c in changed if not c.startswith(_RESUMABLE_CHANGES)]
    if blocking:
      raise ConfigError(
          f'{self.workdir} was trained with a different config ({"; ".join(blocking)}); '
          'use a new --workdir, or pass --config.resume_mismatch=ignore if the change is deliberate')
    for c in changed:
      print(f'resuming with a changed config: {c}', flush=True)

  def _init(self, rng, boxed: bool = False):
    variables = dict(self.task.init(rng, self.example))
    params = variables.pop('params')
    if not boxed:
      params, variables = nn.meta.unbox((params, variables))
    unboxed = nn.meta.unbox(params)
    return steps_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(unboxed),
        model_state=variables,
        ema_params=params if self.config.train.ema_decay > 0 else None)

  def _build_state_shardings(self):
    rng = jax.random.key(self.config.seed)
    boxed = jax.eval_shape(functools.partial(self._init, boxed=True), rng)
    abstract = jax.eval_shape(self._init, rng)
    param_sh = sharding.logical_shardings(boxed.params, abstract.params, self.mesh)
    rep = sharding.replicated(self.mesh)
    self.state_shardings = steps_lib.TrainState(
        step=rep, params=param_sh,
        opt_state=sharding.opt_state_shardings(abstract.opt_state, abstract.params, param_sh,
                                               self.mesh),
        model_state=jax.tree.map(lambda _: rep, abstract.model_state),
        ema_params=param_sh if abstract.ema_params is not None else None)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self.state_shardings)
    self.param_count = sum(x.size for x in jax.tree.leaves(abstract.params))
    optim.check_patterns(self.config.optim, abstract.params)

  def _jit_steps(self):
    c, rep = self.config, sharding.replicated(self.mesh)
    batch_sh = sharding.batch_sharding(self.mesh)
    batch_shardings = jax.tree.map(lambda _: batch_sh, self.example)
    self.train_step = jax.jit(
        functools.partial(steps_lib.train_step, loss_fn=self.task.loss, tx=self.tx, seed=c.seed,
                          grad_accum_steps=c.train.grad_accum_steps,
                          ema_decay=c.train.ema_decay, shardings=self.state_shardings),
        in_shardings=(self.state_shardings, batch_shardings,
                      *([] if self.teacher is None else [self.teacher.shardings])),
        out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.eval_step = jax.jit(
        functools.partial(steps_lib.eval_step, sums_fn=self.task.eval_sums), out_shardings=rep)

  def initial_state(self):
    """The latest checkpoint, resharded onto this mesh, or a fresh state created sharded."""
    step = self.ckpt.latest_step()
    if step is None:
      return self._fresh_state()
    self._check_shapes(step)
    state = checkpoint.restore(self.ckpt, step, self.abstract_state)
    if not self.read_only:
      print(f'resuming from {self.ckpt.directory}/{step}', flush=True)
    return state

  def _check_shapes(self, step: int):
    try:
      saved = self.ckpt.item_metadata(step)
    except Exception:  # pylint: disable=broad-except  Unreadable: the restore will say so.
      return
    try:
      saved = saved['params']
    except (KeyError, TypeError):
      return  # Not a train state's metadata: the restore itself reports a mismatch.
    ours = dict(_paths(self.abstract_state.params))
    theirs = dict(_paths(saved))
    for path in sorted(set(ours) | set(theirs)):
      a = tuple(theirs[path].shape) if path in theirs else None
      b = tuple(ours[path].shape) if path in ours else None
      if a != b:
        raise ConfigError(
            f"checkpoint {self.ckpt.directory}/{step}'s shapes differ from the config "
            f'(params/{path}: {a} in the checkpoint vs {b} here); resume with the config it '
            f'was trained with ({os.path.join(self.workdir, "config.json")}) or use a new '
            '--workdir')

  def _fresh_state(self):
    # Runs once, so compile it fast: XLA's backend optimisations would take longer (2.4 s
    # against 1.1 s for the small LM on CPU) than they could ever save.
    init = jax.jit(self._init, out_shardings=self.state_shardings,
                   compiler_options={'xla_backend_optimization_level': 0})
    state = init(jax.random.key(self.config.seed))
    if self.config.init.workdir:
      state = transfer.load(state, self.abstract_state, self.config.init, self.is_main)
    return state

  def abstract_batch(self) -> dict:
    """Shapes and dtypes of one global training batch, to compile the step without data."""
    # With its sharding, so the executable compiled from it is the one the first step reuses.
    batch_sh = sharding.batch_sharding(self.mesh)
    return {k: jax.ShapeDtypeStruct((self.config.train.batch_size,) + v.shape[1:], v.dtype,
                                    sharding=batch_sh)
            for k, v in self.example.items()}

  def compile_and_init(self):
    """Compiles the train step, then creates (or restores) the state it starts from.

    In that order, so the compiler's scratch memory (270 MiB for the Shakespeare model on
    CPU, more than everything else) is handed back before the state exists instead of stacking
    on top of it; `jit` keeps the executable for the first step.
    """
    self.train_step.lower(self.abstract_state, self.abstract_batch(),
                          *self.abstract_frozen).compile()
    _return_freed_memory()
    state = self.initial_state()
    if self.teacher is not None:
      self.frozen = (self.teacher.load(),)
    _return_freed_memory()
    return state

  # --- evaluation ---------------------------------------------------------------------------

  def evaluate(self, state, split: str, prefix: str = 'eval', training: bool = False) -> dict:
    """The task's metrics of a split (and its report files) under `params` or their EMA.

    Like the training loop, this reads each batch's sums one step late, so at most two eval
    steps are in flight, and adds them up on the host in float64. Dispatching the whole split
    at once deadlocked XLA:CPU with two devices on two cores (an all-reduce waited forever for
    a device whose launch was blocked in the runtime; lm.main splits CPUs so by default).
    """
    params = state.ema_params if state.ema_params is not None else state.params
    totals, pending = None, None

    def add(sums):
      nonlocal totals
      sums = jax.tree.map(_widen, jax.device_get(sums))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)

    for batch in self.task.eval_batches(split):
      sums = self.eval_step(params, state.model_state, sharding.to_global(batch, self.mesh))
      if pending is not None:
        add(pending)
      pending = sums
    add(pending)
    return self.task.summarize(totals, split, prefix, training=training)

  # --- the loop -----------------------------------------------------------------------------

  def evaluate_latest(self) -> dict:
    """--mode=eval: the latest complete checkpoint on the eval (and test) split.

    The result is appended to metrics.jsonl (one line, appended whole, so a run training in
    the workdir is not disturbed) when the workdir is writable; it is always returned.
    """
    # Read-only: a run training in the workdir keeps its in-flight save and its checkpoints.
    then = 'run --mode=eval again to evaluate'
    if self.config.quant.export:  # Weights only (python -m lm.quantize).
      step, state = quantize.restore_latest(self.workdir, self.abstract_state,
                                            self.config.quant.export, then)
    else:
      step, state = checkpoint.restore_latest(self.workdir, self.abstract_state, then=then)
    writable = os.access(self.workdir, os.W_OK)
    self.task.write_reports = writable
    d = self.config.data
    out = self.evaluate(state, d.eval_split)
    if d.test_split:
      if self.task.has_split(d.test_split):
        out.update(self.evaluate(state, d.test_split, prefix='test'))
      elif self.is_main:
        print(f'no {d.test_split!r} split in {d.data_dir!r}: evaluated {d.eval_split!r} only',
              flush=True)
    if writable:
      metrics_lib.append_row(self.workdir, step, {**out, 'eval/data_dir': self.config.data.data_dir})
    elif self.is_main:
      print(f'note: {self.workdir} is not writable; the result is printed, not appended to '
            'metrics.jsonl', flush=True)
    return {'step': step, **out}

  def describe(self, resuming_from: int | None) -> None:
    """The block printed before training: where, on what, which data, fresh or resumed."""
    if not self.is_main:
      return
    c = self.config
    devices = jax.devices()
    state = (f'has a checkpoint at step {resuming_from}' if resuming_from is not None else
             'fresh: no checkpoint')
    lines = [
        f'workdir: {os.path.abspath(self.workdir)} ({state})',
        f'task: {c.task}; devices: {len(devices)} x {devices[0].device_kind} '
        f'({jax.process_count()} process{"es" if jax.process_count() > 1 else ""}); mesh: ' +
        ', '.join(f'{k}={v}' for k, v in self.mesh.shape.items()),
        f'model: {c.model.name}, {self.param_count:,} parameters',
        *self.init_notes,
        *(f'data: {line}' for line in self.task.describe()),
        f'steps: {self.steps:,} x batch {c.train.batch_size} '
        f'({self.task.items_per_step:,} {self.task.unit} a step); eval every '
        f'{self.eval_every or self.steps}, checkpoint every {c.train.checkpoint_every}',
    ]
    print('\n'.join(lines), flush=True)

  def run(self, stop_after: int | None = None, stop: 'StopFlag | None' = None) -> dict:
    """Trains to train.steps; `stop_after` stops early with a checkpoint, as a preemption would.

    `stop` is the signal flag lm.main installs before loading data, so a SIGTERM that comes
    during set-up is honoured too.
    """
    stop = stop or StopFlag()
    resuming_from = checkpoint.latest_step(self.workdir)
    self.describe(resuming_from)
    state = self.compile_and_init()
    self._write_workdir(fresh=resuming_from is None)
    start = int(jax.device_get(state.step))
    if stop.requested:
      print(f'stopped before training resumed (at step {start}); nothing new to save. Run the '
            'same command to continue.', flush=True)
      return {'stopped_at': start}
    writer = metrics_lib.Writer(self.workdir, self.is_main)
    flops = self.task.flops_per_step({'params': state.params, **state.model_state},
                                     self.example)
    log = _StepLog(self, writer, flops)
    rollbacks = 0
    try:
      while True:
        try:
          state, final = self._loop(state, log, stop, stop_after)
          break
        except _NonFinite as bad:
          rollbacks += 1
          if (self.config.train.on_nan != 'rollback' or
              rollbacks > self.config.train.max_rollbacks):
            raise Diverged(self._nonfinite_message(bad, rollbacks)) from None
          state = self._roll_back(bad)
      writer.close()  # In the try: a full disk at the last flush is reported too.
    except OSError as e:  # Metrics and plots; checkpoint writes report through _save.
      if e.errno != errno.ENOSPC:
        raise
      self._save_failed(None, e, what='writing metrics')
    finally:
      # After an error the writer's own flush fails on the same full disk; the error already
      # on its way up is the one to report.
      writer.close(quiet=True)
      self._wait_for_saves()  # Whatever happened, saves in flight finish before we leave.
    if 'stopped_at' in final:
      return final
    self.task.finish(self.workdir)
    if self.prune is not None:
      params = multihost_utils.process_allgather(state.params, tiled=True)  # All processes.
      if self.is_main:
        print(prune.write_report(self.workdir, params, self.prune), flush=True)
    if self.is_main:
      workdir_lib.write_json(os.path.join(self.workdir, 'DONE'), {'step': self.steps, **final})
    return final

  def _loop(self, state, log: '_StepLog', stop: 'StopFlag', stop_after):
    c = self.config.train
    start = int(jax.device_get(state.step))
    final, pending = {}, None
    prefetcher = prefetch.Prefetcher(self._train_batch, self.steps, self.prefetch)
    for step in range(start, self.steps):
      batch = prefetcher.get(step)
      state, m = self.train_step(state, batch, *self.frozen)
      if pending is not None:
        log.record(*pending)
      pending = (step, m)
      done = step + 1
      is_last = done == self.steps
      eval_due = is_last or (self.eval_every and done % self.eval_every == 0)
      stopping = stop.should_stop(done, c.log_every) or done == stop_after
      ckpt_due = is_last or done % c.checkpoint_every == 0 or stopping
      if not (eval_due or ckpt_due):
        continue
      log.record(*pending)  # Before saving: a checkpoint never follows an unchecked step.
      pending = None
      if eval_due:
        final = self.evaluate(state, self.config.data.eval_split, training=True)
        log.write_eval(done, final)
      _return_freed_memory()  # The eval step's compile scratch, before a save adds its own.
      if ckpt_due:
        self._save(done, state)
      if stopping and not is_last:
        self._wait_for_saves()
        print(f'stopped at step {done}; checkpoint saved in {self.ckpt.directory}/{done}. '
              'Run the same command to continue.', flush=True)
        return state, {'stopped_at': done}
    if start >= self.steps:
      final = self.evaluate(state, self.config.data.eval_split, training=True)
    if self.config.data.test_split:
      test = self.evaluate(state, self.config.data.test_split, prefix='test')
      log.write_eval(self.steps, test)
      final.update(test)
    self._wait_for_saves()
    return state, final

  # --- faults -------------------------------------------------------------------------------

  def _skipped_path(self) -> str:
    return os.path.join(self.workdir, 'skipped_steps.json')

  def _skipped(self) -> list[int]:
    if not hasattr(self, '_skipped_steps'):
      path = self._skipped_path()
      self._skipped_steps = json.load(open(path)) if os.path.exists(path) else []
    return self._skipped_steps

  def _train_batch(self, step: int) -> dict:
    """Step `step`'s global batch, on the devices."""
    return sharding.to_global(self.task.data.train_batch(self._batch_index(step)), self.mesh)

  def _batch_index(self, step: int) -> int:
    """A skipped step trains on a spare batch from past the end of the run instead.

    Each rollback gets its own spare (the list's position of its entry), so a step that fails
    twice is not retried on the spare that already failed.
    """
    skipped = self._skipped()
    if step not in skipped:
      return step
    return self.steps + len(skipped) - 1 - skipped[::-1].index(step)

  def _roll_back(self, bad: '_NonFinite'):
    self._skipped().append(bad.step)
    if self.is_main:
      workdir_lib.write_atomic(self._skipped_path(), json.dumps(self._skipped()))
    self._wait_for_saves()
    last = self.ckpt.latest_step()
    target = f'checkpoint {last}' if last is not None else 'the initial state (no checkpoint yet)'
    print(f'non-finite loss at step {bad.step}: rolling back to {target} and training on a '
          f'spare batch in its place (steps skipped so far: {self._skipped()})', flush=True)
    if last is None:
      return self._fresh_state()
    return checkpoint.restore(self.ckpt, last, self.abstract_state)

  def _nonfinite_message(self, bad: '_NonFinite', rollbacks: int) -> str:
    t = self.config.train
    if t.on_nan == 'rollback':
      why = f'after {rollbacks - 1} rollbacks (train.max_rollbacks={t.max_rollbacks})'
      advice = 'or raise train.max_rollbacks'
    else:
      why, advice = 'and train.on_nan=stop', 'or set train.on_nan=rollback'
    last = self.ckpt.latest_step()
    where = (f'the last good checkpoint is step {last} in {self.ckpt.directory}'
             if last is not None else 'there is no checkpoint yet')
    return (f'loss, gradient or new state is not finite at step {bad.step} (loss={bad.loss}, '
            f'grad_norm={bad.grad_norm}) {why}; the update was skipped and {where}. Lower '
            f'optim.lr or raise optim.warmup_steps, {advice}')

  def _save(self, step: int, state):
    try:
      checkpoint.save(self.ckpt, step, state)
    except _SAVE_ERRORS as e:
      self._save_failed(step, e)

  def _wait_for_saves(self):
    try:
      self.ckpt.wait_until_finished()
    except _SAVE_ERRORS as e:
      self._save_failed(None, e)

  def _save_failed(self, step, error: Exception, what: str = 'saving a checkpoint'):
    # The manager lists a save from when it starts: let one in flight finish, or fail on the
    # same full disk (orbax then drops it from the list), before saying what is kept.
    try:
      self.ckpt.wait_until_finished()
    except _SAVE_ERRORS:
      pass
    steps = [s for s in self.ckpt.all_steps() if s != step]
    full = 'No space left' in str(error) or getattr(error, 'errno', None) == errno.ENOSPC
    reason = 'No space left on device' if full else (str(error).strip().splitlines() or [
        type(error).__name__])[0][:160]
    fix = 'Free space and run' if full else 'Run'
    raise ConfigError(
        f'{what} failed ({reason}); the complete checkpoints {steps} in '
        f'{self.ckpt.directory} are kept. {fix} the same command to resume') from error


# What a failed checkpoint write raises (tensorstore reports a full disk as ValueError).
_SAVE_ERRORS = (OSError, ValueError, RuntimeError)


class _NonFinite(Exception):

  def __init__(self, step: int, m: dict):
    super().__init__(step)
    self.step, self.loss, self.grad_norm = step, float(m['loss']), float(m['grad_norm'])


class _StepLog:
  """Reads each step's metrics one step late and writes a row every `log_every` steps."""

  # Per-step values the row reports as they are at its step, not as window means.
  _INSTANT = ('grad_norm', 'finite')

  def __init__(self, trainer: Trainer, writer: metrics_lib.Writer, flops: float):
    self.trainer, self.writer, self.flops = trainer, writer, flops
    self.peak = metrics_lib.peak_flops_per_device() * jax.device_count()
    self.progress = metrics_lib.Progress(trainer.steps, trainer.task.unit, trainer.is_main)
    self.window, self.t0, self.n = [], None, 0

  def record(self, step: int, m) -> None:
    m = jax.device_get(m)
    if not m['finite']:
      self.t0 = None
      raise _NonFinite(step, m)
    self.window.append({k: float(v) for k, v in m.items() if k not in self._INSTANT})
    now = time.perf_counter()
    if self.t0 is None:  # Time from the end of the first step, which compiles.
      self.t0 = now
    else:
      self.n += 1
    done, t = step + 1, self.trainer
    if self.n == 0 and len(self.window) == 1 and done % t.config.train.log_every:
      # The first step of this process: a sign of life long before the first row.
      self.progress.update(done, self.window[0]['loss'], math.nan, math.nan)
      _return_freed_memory()  # What the first execution and the peak measurement freed.
    if done % t.config.train.log_every and done != t.steps:
      return
    # The loss and the task's metrics are means over the steps since the last row.
    row = {f'train/{k}': float(np.mean([w[k] for w in self.window])) for k in self.window[0]}
    row.update({'train/grad_norm': float(m['grad_norm']), 'train/lr': float(t.lr(step))})
    if self.n:
      step_s = (now - self.t0) / self.n
      per_s = t.task.items_per_step / step_s
      row.update({'perf/step_time_ms': step_s * 1e3, f'perf/{t.task.unit}_per_s': per_s,
                  'perf/mfu': self.flops / step_s / self.peak})
      self.progress.update(done, row['train/loss'], per_s, step_s)
    self.writer.write(done, row)
    # Freed heap the XLA runtime's threads keep growing otherwise (~50 MiB in the first few
    # hundred steps of the Shakespeare model); a few ms once a row.
    _return_freed_memory()
    self.window, self.t0, self.n = [], now, 0

  def write_eval(self, step: int, results: dict) -> None:
    self.writer.write(step, results)
    if self.trainer.is_main:
      print(f'step {step}: ' + '  '.join(f'{k} {v:.4f}' for k, v in results.items()),
            flush=True)
    self.t0, self.n = time.perf_counter(), 0  # Eval time is not step time.


def _paths(tree):
  """(path 'a/b/c', leaf) pairs of a tree of arrays or metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  return [(jax.tree_util.keystr(p, simple=True, separator='/'), x) for p, x in leaves]


def _widen(x) -> np.ndarray:
  """float64 for floats, so that sums over many batches do not lose precision."""
  x = np.asarray(x)
  return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x


def _return_freed_memory() -> None:
  """Gives the heap glibc keeps after XLA's compiler frees its scratch back to the OS."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc: nothing to do.
    pass


class StopFlag:
  """Turns SIGTERM/SIGINT into 'save a checkpoint after this step and exit 0'.

  A repeat within `_REPEAT_S` of the first signal is the same request (cluster wrappers
  often signal twice); a later one means "stop now", without saving.
  """

  _REPEAT_S = 10.0

  def __init__(self):
    self.requested, self._first = False, None
    self.install()

  def install(self):
    """(Re)claims SIGTERM and SIGINT. `jax.distributed.initialize` installs a SIGTERM
    handler of its own (its preemption notifier), so call this again after it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. under some test runners).
        pass

  def should_stop(self, step: int, every: int) -> bool:
    """With several processes, all must stop at the same step (or the save would hang), so
    they compare flags every `every` steps; one process decides on its own."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def exiting(self):
    """The run has stopped and saved. Python restores the default handlers as it shuts down,
    so a repeat signal then would kill the process and turn exit 0 into -15: ignore it."""
    if self.requested:
      for sig in (signal.SIGTERM, signal.SIGINT):
        try:
          signal.signal(sig, signal.SIG_IGN)
        except ValueError:
          pass

  def _handle(self, signum, frame):
    del frame
    now = time.monotonic()
    if self.requested:
      if now - self._first < self._REPEAT_S:
        print(f'received signal {signum} again: already stopping', flush=True)
        return
      raise KeyboardInterrupt  # A later signal means "now".
    print(f'\nreceived signal {signum}: finishing the step in flight and saving', flush=True)
    self.requested, self._first = True, now
