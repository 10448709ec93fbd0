"""Distillation: the loss against its formula, the teacher as an argument of the step (never in
the state or a checkpoint), the KL term pulling the student to the teacher, and bad teachers."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm import config as config_lib
from lm import sharding
from lm import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_LM = os.path.join(HERE, 'tiny_config.py')
TINY_CNN = os.path.join(HERE, 'tiny_cnn_config.py')
TINY_TEXT = os.path.join(HERE, 'tiny_text_config.py')


def cfg(path, **overrides):
  c = config_lib.load(path)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  """A tiny 2-layer char LM and a tiny ResNet-20 (quarter width) with BatchNorm."""
  lm_dir = str(tmp_path_factory.mktemp('lm_teacher'))
  train.Trainer(cfg(TINY_LM, **{'train.steps': 30, 'train.eval_every': 0}), lm_dir).run()
  cnn_dir = str(tmp_path_factory.mktemp('cnn_teacher'))
  train.Trainer(cfg(TINY_CNN, **{'train.steps': 6, 'model.name': 'resnet20',
                                 'model.width': 0.25, 'train.checkpoint_every': 6}),
                cnn_dir).run()
  return {'lm': lm_dir, 'cnn': cnn_dir}


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def expected(student, teacher, labels, weights, alpha, t):
  """(1 - alpha) * weighted CE + alpha * T^2 * weighted KL(teacher_T || student_T), in numpy."""
  student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
  ce = -np.take_along_axis(log_softmax(student), labels[..., None], -1)[..., 0]
  pt, ps = log_softmax(teacher / t), log_softmax(student / t)
  kl = (np.exp(pt) * (pt - ps)).sum(-1) * t * t
  mean = lambda v: (v * weights).sum() / weights.sum()
  return (1 - alpha) * mean(ce) + alpha * mean(kl), mean(kl)


def test_lm_distillation_loss_is_the_formula(teachers, tmp_path):
  c = cfg(TINY_LM, **{'model.num_layers': 1, 'distill.teacher_workdir': teachers['lm'],
                      'distill.alpha': 0.3, 'distill.temperature': 2.5})
  trainer = train.Trainer(c, str(tmp_path))
  state = trainer.compile_and_init()
  frozen = trainer.frozen[0]
  batch = trainer.task.data.train_batch(0)
  loss, aux = trainer.task.loss(state.params, {}, batch, jax.random.key(0), frozen=frozen)
  student = trainer.task.model.apply({'params': state.params}, batch['tokens'])
  teacher = trainer.task.teacher.apply({'params': frozen['params']}, batch['tokens'])
  want, kl = expected(student, teacher, batch['targets'], np.ones(batch['targets'].shape),
                      0.3, 2.5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux['metrics']['distill_kl']), kl, rtol=1e-5)
  assert trainer.task.teacher.config.num_layers == 2  # Built from the teacher's config.json.


def test_classifier_distillation_skips_padding_rows(teachers, tmp_path):
  c = cfg(TINY_CNN, **{'distill.teacher_workdir': teachers['cnn'], 'distill.alpha': 0.7,
                       'distill.temperature': 4.0})
  trainer = train.Trainer(c, str(tmp_path))
  state = trainer.compile_and_init()
  frozen = trainer.frozen[0]
  batch = dict(trainer.task.data.train_batch(0))
  batch['valid'] = np.array([1, 1, 1, 0, 1, 0, 1, 1], np.float32)  # Two padding rows.
  loss, _ = trainer.task.loss(state.params, state.model_state, batch, jax.random.key(0),
                              frozen=frozen)
  student = trainer.task.model.apply({'params': state.params}, batch['image'], train=True)
  teacher = trainer.task.teacher.apply({'params': frozen['params'], **frozen['model_state']},
                                       batch['image'], train=False)
  want, _ = expected(student, teacher, batch['label'], batch['valid'], 0.7, 4.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # The teacher's BatchNorm statistics are its trained ones, not fresh ones.
  assert float(np.abs(jax.tree.leaves(frozen['model_state'])[0]).sum()) > 0


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, '..', 'shared', 'text', 'sms_spam')),
                    reason='needs ../shared/text/sms_spam')
def test_text_classifier_distills_from_a_wider_deeper_teacher(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  train.Trainer(cfg(TINY_TEXT, **{'train.steps': 10, 'train.eval_every': 0,
                                  'train.checkpoint_every': 10, 'model.num_layers': 2,
                                  'model.d_model': 32, 'model.dropout': 0.0}), teacher_dir).run()
  c = cfg(TINY_TEXT, **{'distill.teacher_workdir': teacher_dir, 'distill.alpha': 0.3,
                        'distill.temperature': 3.0, 'model.dropout': 0.0})
  trainer = train.Trainer(c, str(tmp_path / 'student'))
  state = trainer.compile_and_init()
  frozen = trainer.frozen[0]
  assert trainer.teacher.param_count > sum(x.size for x in jax.tree.leaves(state.params))
  batch = dict(trainer.task.data.train_batch(0))
  batch['valid'] = np.ones(batch['label'].shape, np.float32)
  batch['valid'][::3] = 0  # Padding rows count nothing in either term.
  loss, _ = trainer.task.loss(state.params, state.model_state, batch, jax.random.key(0),
                              frozen=frozen)
  student = trainer.task.logits(state.params, state.model_state, batch, train=False)[0]
  teacher = trainer.task.teacher_logits(frozen, batch)
  assert not np.allclose(student, teacher)
  want, _ = expected(student, teacher, batch['label'], batch['valid'], 0.3, 3.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_the_teacher_is_an_argument_of_the_step_not_state_or_checkpoint(teachers, tmp_path):
  c = cfg(TINY_LM, **{'model.num_layers': 1, 'distill.teacher_workdir': teachers['lm'],
                      'train.steps': 2, 'train.checkpoint_every': 2, 'train.eval_every': 0})
  trainer = train.Trainer(c, str(tmp_path))
  trainer.run()
  student_paths = set(trainer.abstract_state.params['block_0']) | set(trainer.abstract_state.params)
  mngr = ocp.CheckpointManager(os.path.join(str(tmp_path), 'checkpoints'),
                               item_handlers=ocp.StandardCheckpointHandler())
  meta = mngr.item_metadata(2)
  assert set(meta) == {'step', 'params', 'opt_state', 'model_state', 'ema_params'}
  saved = jax.tree_util.tree_flatten_with_path(meta['params'])[0]
  ours = jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]
  assert [p for p, _ in saved] == [p for p, _ in ours]  # The student's tree and nothing else.
  assert 'block_1' not in meta['params'] and 'block_1' not in student_paths
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  assert count(meta['params']) == trainer.param_count
  # The same compiled step with other teacher weights gives another loss: they are an argument.
  state = trainer.compile_and_init()
  batch = sharding.to_global(trainer.task.data.train_batch(0), trainer.mesh)
  frozen = trainer.frozen[0]
  silent = jax.tree.map(lambda x: x * 0, frozen)
  _, m1 = trainer.train_step(jax.tree.map(lambda x: x.copy(), state), batch, frozen)
  _, m2 = trainer.train_step(jax.tree.map(lambda x: x.copy(), state), batch, silent)
  assert float(m1['distill_kl']) != float(m2['distill_kl'])
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_the_kl_term_moves_the_student_toward_the_teacher(teachers, tmp_path):
  c = cfg(TINY_LM, **{'model.num_layers': 1, 'distill.teacher_workdir': teachers['lm'],
                      'distill.alpha': 1.0, 'distill.temperature': 1.0, 'train.steps': 40,
                      'train.eval_every': 0, 'train.log_every': 5, 'optim.lr': 1e-2})
  train.Trainer(c, str(tmp_path)).run()
  rows = [json.loads(l) for l in open(os.path.join(str(tmp_path), 'metrics.jsonl'))]
  kl = [r['train/distill_kl'] for r in rows if 'train/distill_kl' in r]
  assert len(kl) == 8 and kl[-1] < 0.5 * kl[0], kl
  # alpha = 1: the loss is the KL term alone (no penalties here).
  np.testing.assert_allclose([r['train/loss'] for r in rows if 'train/loss' in r], kl,
                             rtol=1e-6)


def cli(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'lm.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)


def test_bad_teachers_are_one_line_and_exit_2(teachers, tmp_path):
  other_classes = str(tmp_path / 'other_classes')
  shutil.copytree(teachers['cnn'], other_classes)
  with open(os.path.join(other_classes, 'config.json')) as f:
    saved = json.load(f)
  saved['model']['num_classes'] = 100
  with open(os.path.join(other_classes, 'config.json'), 'w') as f:
    json.dump(saved, f)
  cases = [
      ((f'--config={TINY_LM}', '--config.data.tokenizer=byte',
        f'--config.distill.teacher_workdir={teachers["lm"]}'),
       "has another vocabulary (char, 65 tokens) than this student (byte, 256 tokens)"),
      ((f'--config={TINY_CNN}', f'--config.distill.teacher_workdir={other_classes}'),
       'predicts other classes (100 classes) than this student (airplane, automobile'),
      ((f'--config={TINY_CNN}', f'--config.distill.teacher_workdir={teachers["lm"]}'),
       "was trained on task 'lm', this run is 'classify'"),
      ((f'--config={TINY_CNN}', '--config.distill.teacher_workdir=/does/not/exist'),
       'does not exist'),
      ((f'--config={TINY_CNN}', f'--config.distill.teacher_workdir={teachers["cnn"]}',
        '--config.distill.temperature=0'), 'distill.temperature=0.0 must be'),
  ]
  for i, (args, needle) in enumerate(cases):
    result = cli(*args, f'--workdir={tmp_path / str(i)}')
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], args
    assert needle in result.stderr, result.stderr
    assert not (tmp_path / str(i)).exists()
