"""Knowledge distillation (Hinton et al. 2015): a trained teacher's logits as a second target.

`config.distill.teacher_workdir` names a finished run of the same task. Its config.json builds
the teacher's model through the student's task (`task.make_model`), so the task computes the
teacher's logits the way it computes its own (`task.teacher_logits`), and the loss becomes
(1 - alpha) * task loss + alpha * T^2 KL(teacher_T || student_T) (`Task.distill`). The
teacher's latest weights (its EMA if it kept one: what it evaluated) and non-trainable
collections (BatchNorm statistics) are restored read-only onto the student's mesh, sharded by
the same logical-axis rules. They are held fixed: the trainer passes them to the jitted step as
its `frozen` argument, so they are never in the train state, the optimizer or a checkpoint.

A teacher must predict what the student predicts: the same task, the same classes, the same
vocabulary (its tokenizer, for text); anything else is refused before training.
"""

import math
import os

import flax.linen as nn
import jax

from lm import checkpoint
from lm import config as config_lib
from lm import sharding
from lm.checkpoint import ocp  # Imports orbax at first use.
from lm.config import ConfigError


def _check_settings(d) -> None:
  if not (math.isfinite(d.alpha) and 0 <= d.alpha <= 1):
    raise ConfigError(f'distill.alpha={d.alpha} must be in [0, 1]')
  if not (math.isfinite(d.temperature) and d.temperature > 0):
    raise ConfigError(f'distill.temperature={d.temperature} must be a finite number > 0')


def _teacher_config(workdir: str):
  if not os.path.isdir(workdir):
    raise ConfigError(f'distill.teacher_workdir {workdir!r} does not exist; point it at a '
                      'trained run')
  if checkpoint.latest_step(workdir) is None:
    raise ConfigError(f'distill.teacher_workdir {workdir!r} has no checkpoint; train the '
                      'teacher first')
  return config_lib.from_saved(checkpoint.load_config(workdir).to_dict())


def _check_outputs(task, teacher_cfg, workdir: str) -> None:
  """The teacher's outputs mean what the student's do: classes, or the vocabulary."""
  config = task.config
  if teacher_cfg.task != config.task:
    raise ConfigError(f'distill.teacher_workdir {workdir!r} was trained on task '
                      f'{teacher_cfg.task!r}, this run is {config.task!r}; distill from a run of '
                      'the same task')
  if teacher_cfg.quant.export:
    raise ConfigError(f'distill.teacher_workdir {workdir!r} is an export of quantized weights; '
                      'use the float run it came from')
  tokenizer = getattr(task.data, 'tokenizer', None)
  if tokenizer is not None:
    from lm import data  # pylint: disable=g-import-not-at-top
    if not os.path.exists(os.path.join(workdir, 'tokenizer.json')):
      raise ConfigError(f'distill.teacher_workdir {workdir!r} has no tokenizer.json; it is not '
                        'a finished text run')
    theirs = data.load_tokenizer(workdir)
    if theirs.to_json() != tokenizer.to_json():
      raise ConfigError(
          f'the teacher in {workdir!r} has another vocabulary ({theirs.to_json()["kind"]}, '
          f'{theirs.vocab_size:,} tokens) than this student ({tokenizer.to_json()["kind"]}, '
          f'{tokenizer.vocab_size:,} tokens); distill from a teacher trained with the same '
          'tokenizer and data')
  classes = getattr(task, 'class_names', None)
  if classes is not None:
    from lm import labelled_text  # pylint: disable=g-import-not-at-top
    theirs = None
    if os.path.exists(labelled_text.labels_path(workdir)):
      theirs = tuple(labelled_text.load_labels(workdir))
    if teacher_cfg.model.num_classes != len(classes) or theirs not in (None, tuple(classes)):
      names = ', '.join(theirs) if theirs else f'{teacher_cfg.model.num_classes} classes'
      raise ConfigError(f'the teacher in {workdir!r} predicts other classes ({names}) than this '
                        f'student ({", ".join(classes)}); distill from a teacher of the same '
                        'classes')


class Teacher:
  """The teacher's model (set on the task), its weights' abstract tree and shardings, and
  `load()`, which restores the weights: the jitted step's `frozen` argument."""

  def __init__(self, config, task, mesh, example_batch):
    _check_settings(config.distill)
    self.workdir = config.distill.teacher_workdir
    teacher_cfg = _teacher_config(self.workdir)
    _check_outputs(task, teacher_cfg, self.workdir)
    self.model = task.make_model(teacher_cfg.model)
    boxed = dict(jax.eval_shape(lambda rng: task.init(rng, example_batch, model=self.model),
                                jax.random.key(0)))
    boxed_params = boxed.pop('params')
    params, model_state = nn.meta.unbox((boxed_params, boxed))
    rep = sharding.replicated(mesh)
    self.shardings = {'params': sharding.logical_shardings(boxed_params, params, mesh),
                      'model_state': jax.tree.map(lambda _: rep, model_state)}
    self.abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {'params': params, 'model_state': model_state}, self.shardings)
    self.param_count = sum(x.size for x in jax.tree.leaves(params))
    task.teacher = self.model
    d = config.distill
    self.notes = [f'distill: teacher {teacher_cfg.model.name} ({self.param_count:,} '
                  f'parameters) from {self.workdir}; alpha {d.alpha:g}, temperature '
                  f'{d.temperature:g}']

  def load(self):
    """The teacher's weights, restored read-only into `self.abstract`'s shardings."""
    mngr = checkpoint.reader(self.workdir, handler=ocp.PyTreeCheckpointHandler())
    try:
      step = mngr.latest_step()
      meta, weights = checkpoint.saved_weights(mngr, step)
      _check_shapes(meta[weights], self.abstract['params'], self.workdir)
      item = {weights: self.abstract['params']}
      if self.abstract['model_state']:
        item['model_state'] = self.abstract['model_state']
      restored = checkpoint.restore_part(mngr, step, item)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  orbax/tensorstore raise many kinds.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise ConfigError(f'distill: cannot read the teacher in {self.workdir} ({reason})') from e
    finally:
      mngr.close()
    return {'params': restored[weights], 'model_state': restored.get('model_state', {})}


def _check_shapes(saved, abstract, workdir: str) -> None:
  ours = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  theirs = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(
      saved, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]}
  for path in sorted(set(ours) | set(theirs)):
    if ours.get(path) != theirs.get(path):
      raise ConfigError(
          f"the teacher in {workdir!r} does not fit the model its config.json describes "
          f'(params/{path}: {theirs.get(path)} saved, {ours.get(path)} built); its vocabulary '
          'or classes differ from this student\'s')


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')
