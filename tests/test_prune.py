"""Magnitude pruning: exact masks, 2:4 structure, the cubic schedule, zeros that stay zero,
masks that resume bit-exactly, the report, and bad input through the CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint
from lm import config as config_lib
from lm import prune
from lm import train
from lm.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_CNN = os.path.join(HERE, 'tiny_cnn_config.py')
TINY_LM = os.path.join(HERE, 'tiny_config.py')


def prune_cfg(**overrides):
  c = config_lib.get_config().prune
  with c.unlocked():
    c.update(overrides)
  return c


def layouts(seed=0):
  """Weights shaped as this codebase's layers, plus leaves that are never pruned by default."""
  rng = np.random.default_rng(seed)
  shapes = {'Conv_0': {'kernel': (3, 3, 8, 16), 'bias': (16,)},
            'block_0': {'attn': {'qkv': (16, 2, 3, 8), 'qkv_bias': (2, 3, 8), 'out': (2, 8, 16)},
                        'norm_attn': {'scale': (16,)}, 'mlp': {'wi': (16, 64), 'wo': (64, 16)}},
            'Dense_0': {'kernel': (16, 12)}, 'embedding': (20, 16), 'pos_embedding': (8, 16)}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def masks_at(spec, params, sparsity):
  chosen = prune.selection(spec, params)
  ones = jax.tree.map(lambda x, c: jnp.ones(x.shape if c else (), bool), params, chosen)
  return chosen, prune.compute_masks(spec, params, chosen, ones, jnp.float32(sparsity))


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_default_selection_is_the_kernels_and_the_regexes_narrow_it():
  params = layouts()
  spec = prune.spec(prune_cfg(sparsity=0.5), 100)
  chosen = {k for k, v in flat(prune.selection(spec, params)).items() if v}
  assert chosen == {'Conv_0/kernel', 'block_0/attn/qkv', 'block_0/attn/out', 'block_0/mlp/wi',
                    'block_0/mlp/wo', 'Dense_0/kernel'}
  spec = prune.spec(prune_cfg(sparsity=0.5, params='mlp/', skip='wo$'), 100)
  assert {k for k, v in flat(prune.selection(spec, params)).items() if v} == {'block_0/mlp/wi'}


@pytest.mark.parametrize('sparsity', [0.5, 0.7, 0.8, 0.9])
def test_layer_scope_prunes_exactly_the_smallest_floor_s_n_of_each_layer(sparsity):
  params = layouts()
  spec = prune.spec(prune_cfg(sparsity=sparsity), 100)
  chosen, masks = masks_at(spec, params, sparsity)
  for name, picked in flat(chosen).items():
    w, m = flat(params)[name], flat(masks)[name]
    if not picked:
      assert m.shape == () and m
      continue
    assert (~m).sum() == math.floor(sparsity * w.size), name
    assert np.abs(w[~m]).max() <= np.abs(w[m]).min(), name


def test_global_scope_prunes_exactly_floor_s_n_overall_at_one_threshold():
  params = layouts()
  params['block_0']['mlp']['wi'] = params['block_0']['mlp']['wi'] * 10  # Louder: pruned less.
  spec = prune.spec(prune_cfg(sparsity=0.8, scope='global'), 100)
  chosen, masks = masks_at(spec, params, 0.8)
  picked = [k for k, v in flat(chosen).items() if v]
  w = np.concatenate([flat(params)[k].ravel() for k in picked])
  m = np.concatenate([flat(masks)[k].ravel() for k in picked])
  assert (~m).sum() == math.floor(0.8 * w.size)
  assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
  by_layer = {k: 1 - flat(masks)[k].mean() for k in picked}
  assert by_layer['block_0/mlp/wi'] < 0.2 < 0.9 < by_layer['block_0/mlp/wo']


def test_two_four_keeps_the_two_largest_of_every_four_consecutive_inputs():
  params = layouts()
  spec = prune.spec(prune_cfg(pattern='2:4'), 100)
  chosen, masks = masks_at(spec, params, spec.sparsity)
  assert spec.sparsity == 0.5
  # Groups run along the contracting axis: Cin of a conv, D of qkv, Q of the attention output.
  for name, groups in [('Conv_0/kernel', lambda a: a.reshape(3, 3, 2, 4, 16).transpose(0, 1, 2, 4, 3)),
                       ('block_0/attn/qkv', lambda a: a.reshape(4, 4, 48).transpose(0, 2, 1)),
                       ('block_0/attn/out', lambda a: a.reshape(2, 2, 4, 16).transpose(0, 1, 3, 2)),
                       ('Dense_0/kernel', lambda a: a.reshape(4, 4, 12).transpose(0, 2, 1))]:
    m = groups(flat(masks)[name]).reshape(-1, 4)
    w = np.abs(groups(flat(params)[name])).reshape(-1, 4)
    np.testing.assert_array_equal(m.sum(-1), 2, err_msg=name)
    kept_min = np.where(m, w, np.inf).min(-1)
    pruned_max = np.where(m, -np.inf, w).max(-1)
    assert (pruned_max <= kept_min).all(), name


def test_cubic_schedule_of_zhu_and_gupta():
  spec = prune.spec(prune_cfg(sparsity=0.8, start_step=10, end_step=110, every=25), 200)
  for step, want in [(0, 0.0), (9, 0.0), (10, 0.0), (60, 0.8 * (1 - 0.5 ** 3)),
                     (85, 0.8 * (1 - 0.25 ** 3)), (110, 0.8), (150, 0.8)]:
    np.testing.assert_allclose(float(spec.sparsity_at(step)), want, rtol=1e-6, err_msg=step)
  due = [s for s in range(200) if bool(spec.due(s))]
  assert due == [10, 35, 60, 85, 110]
  one_shot = prune.spec(prune_cfg(sparsity=0.8, start_step=5), 200)
  assert [s for s in range(200) if bool(one_shot.due(s))] == [5]
  assert float(one_shot.sparsity_at(4)) == 0
  np.testing.assert_allclose(float(one_shot.sparsity_at(5)), 0.8, rtol=1e-6)


@pytest.mark.parametrize('overrides,needle', [
    ({'sparsity': 1.0}, r'prune.sparsity=1.0 must be in \[0, 1\)'),
    ({'sparsity': -0.1}, r'must be in \[0, 1\)'),
    ({'pattern': '4:2'}, "'N:M' with 0 < N < M"),
    ({'pattern': '2:4', 'sparsity': 0.8}, 'prunes 0.5 of the weights'),
    ({'sparsity': 0.5, 'scope': 'all'}, "must be 'layer' or 'global'"),
    ({'sparsity': 0.5, 'start_step': 50, 'end_step': 20}, 'prune.end_step=20 must be'),
])
def test_bad_settings_are_refused(overrides, needle):
  with pytest.raises(ConfigError, match=needle):
    prune.spec(prune_cfg(**overrides), 100)


def tiny_cnn(**overrides):
  c = config_lib.load(TINY_CNN)
  c.mesh.fsdp = 2  # Conv kernels split over their output axis: masks must follow.
  c.train.update(steps=8, checkpoint_every=4, eval_every=0, log_every=4)
  c.prune.update(sparsity=0.5, start_step=0, end_step=4, every=2)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


@pytest.fixture(scope='module')
def pruned_runs(tmp_path_factory):
  """The same gradual pruning run straight through, and stopped at step 4 and resumed."""
  straight = str(tmp_path_factory.mktemp('straight'))
  resumed = str(tmp_path_factory.mktemp('resumed'))
  train.Trainer(tiny_cnn(), straight).run()
  train.Trainer(tiny_cnn(), resumed).run(stop_after=4)
  reader = train.Trainer(tiny_cnn(), resumed, read_only=True)
  at_4 = jax.device_get(reader.initial_state())
  train.Trainer(tiny_cnn(), resumed).run()
  final = lambda w: jax.device_get(checkpoint.restore_latest(w, reader.abstract_state)[1])
  return {'straight': straight, 'at_4': at_4, 'a': final(straight), 'b': final(resumed),
          'shardings': reader.state_shardings}


def test_masks_are_optimizer_state_sharded_like_their_parameters(pruned_runs):
  state = pruned_runs['a']
  masks = state.opt_state.masks
  mask_sh = pruned_runs['shardings'].opt_state.masks
  param_sh = pruned_runs['shardings'].params
  get = lambda t: t['Conv_2']['kernel']
  assert get(param_sh).spec == get(mask_sh).spec and 'fsdp' in str(get(param_sh).spec)
  assert get(masks).dtype == bool and get(masks).shape == get(state.params).shape


def test_pruned_weights_are_zero_after_fine_tuning_steps(pruned_runs):
  state = pruned_runs['a']
  chosen = flat(prune.selection(prune.spec(tiny_cnn().prune, 8), state.params))
  params, masks = flat(state.params), flat(state.opt_state.masks)
  for name, picked in chosen.items():
    if picked:
      w, m = params[name], masks[name]
      assert (w[~m] == 0).all(), name  # Exactly 0, four steps after the last mask update.
      assert (~m).sum() == math.floor(0.5 * w.size), name
      assert (w[m] != 0).all(), name  # The kept weights still train.


def test_masks_survive_a_checkpoint_resume_bit_exactly(pruned_runs):
  a, b, at_4 = pruned_runs['a'], pruned_runs['b'], pruned_runs['at_4']
  jax.tree.map(np.testing.assert_array_equal, a.opt_state.masks, b.opt_state.masks)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  # The checkpoint at step 4 holds the masks of step 2 (the step-4 update had not run), and
  # the resumed run went on from those.
  assert int(at_4.opt_state.count) == 4
  s2 = float(prune.spec(tiny_cnn().prune, 8).sparsity_at(2))
  kernel = flat(at_4.opt_state.masks)['Conv_2/kernel']
  assert (~kernel).sum() == math.floor(s2 * kernel.size) > 0


def test_sparsity_report_counts_the_zeros_in_the_params(pruned_runs):
  straight, state = pruned_runs['straight'], pruned_runs['a']
  with open(os.path.join(straight, 'sparsity.json')) as f:
    report = json.load(f)
  zeros = sum(int((np.asarray(x) == 0).sum()) for x in jax.tree.leaves(state.params))
  assert report['params'] - report['nonzero_params'] == zeros
  assert 0.49 < report['pruned_sparsity'] <= 0.5
  layer = next(l for l in report['layers'] if l['param'] == 'Conv_2/kernel')
  assert layer['zeros'] == math.floor(0.5 * layer['size'])
  table = open(os.path.join(straight, 'sparsity.md')).read()
  assert '| Conv_2/kernel | 3x3x64x64 | 18,432 of 36,864 | 0.5000 |' in table


@pytest.mark.parametrize('args,needle', [
    (['--config.prune.sparsity=1.0'], 'prune.sparsity=1.0 must be in [0, 1)'),
    (['--config.prune.pattern=2:4'],
     "prune.pattern=2:4 needs groups of 4 inputs, but Conv_0/kernel (3, 3, 3, 32) has 3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', f'--config={TINY_CNN}', f'--workdir={tmp_path / "run"}',
       *args], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert needle in result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('field,value', [('prune.sparsity', 0.5), ('quant.qat', True)])
def test_stacked_layers_are_refused(tmp_path, field, value):
  c = config_lib.load(TINY_LM)
  c.model.scan_layers = True  # Kernels [L, ...]: one "layer" would span every block.
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ConfigError, match='set model.scan_layers=False'):
    train.Trainer(c, str(tmp_path))
