"""int8: rounding and per-layer error bounds, exact integer arithmetic, the straight-through
gradient, int8 exports (a quarter of the float size, evaluated and sampled through the CLI),
and bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm import cnn
from lm import config as config_lib
from lm import model as model_lib
from lm import quantize
from lm import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_LM = os.path.join(HERE, 'tiny_config.py')
TINY_CNN = os.path.join(HERE, 'tiny_cnn_config.py')


def normal(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize('name,shape', [('Conv_0/kernel', (3, 3, 8, 16)),
                                        ('block_0/attn/qkv', (16, 2, 3, 8)),
                                        ('block_0/attn/out', (2, 8, 16)),
                                        ('Dense_0/kernel', (16, 12)), ('embedding', (20, 16))])
def test_weights_round_within_half_a_step_of_their_channel(name, shape):
  w = normal(shape) * normal(shape, seed=1)  # Channels of different ranges.
  axes = quantize.scale_axes(name, len(shape))
  q, scale = quantize.quantize(w, axes)
  assert q.dtype == jnp.int8 and scale.shape == tuple(1 if a in axes else d
                                                      for a, d in enumerate(shape))
  err = np.abs(np.asarray(w) - np.asarray(q, np.float32) * np.asarray(scale))
  assert (err <= np.asarray(scale) * (0.5 + 1e-6)).all()
  # The largest weight of each channel lands on +-127: the whole int8 range is used.
  np.testing.assert_array_equal(np.abs(np.asarray(q)).max(axis=axes), 127)
  # Re-quantizing the dequantized weights gives the same integers: what an export stores is
  # what the int8 model computes with.
  q2, _ = quantize.quantize(q.astype(jnp.float32) * scale, axes)
  np.testing.assert_array_equal(q2, q)


def test_an_all_zero_channel_stays_zero():
  w = normal((8, 4)).at[:, 2].set(0.0)
  q, scale = quantize.quantize(w, (0,))
  assert (np.asarray(q)[:, 2] == 0).all() and np.isfinite(np.asarray(scale)).all()


def test_int8_dot_is_the_integer_product_rescaled():
  x, w = normal((6, 32), 2), normal((32, 5), 3)
  y = quantize.dot(x, w, jnp.float32, mode='int8')
  qx, sx = quantize.quantize(x, (1,))
  qw, sw = quantize.quantize(w, (0,))
  exact = np.asarray(qx, np.int64) @ np.asarray(qw, np.int64)
  np.testing.assert_allclose(y, exact * np.asarray(sx) * np.asarray(sw), rtol=1e-6)


def bound(x, w, sx, sw):
  """|x.w - x^.w^| <= sum_i |dx||w| + |x||dw| + |dx||dw| with |dx| <= sx/2, |dw| <= sw/2."""
  k = x.shape[1]
  return (0.5 * sx * np.abs(w).sum(0)[None, :] + 0.5 * sw * np.abs(x).sum(1)[:, None] +
          0.25 * k * sx * sw)


@pytest.mark.parametrize('mode', ['int8', 'fake'])
def test_a_layer_output_stays_within_its_error_bound(mode):
  x, w = normal((64, 128), 4, scale=3.0), normal((128, 96), 5, scale=0.05)
  y = np.asarray(quantize.dot(x, w, jnp.float32, mode=mode))
  sx = np.asarray(quantize.quantize(x, (1,))[1])
  sw = np.asarray(quantize.quantize(w, (0,))[1])
  err = np.abs(y - np.asarray(x) @ np.asarray(w))
  b = bound(np.asarray(x), np.asarray(w), sx, sw)
  assert (err <= b * (1 + 1e-4) + 1e-6).all()
  assert err.max() > 0  # It is quantized.
  assert err.mean() < 0.1 * b.mean()  # Rounding errors cancel: far inside the worst case.


def test_int8_conv_equals_the_conv_of_its_dequantized_operands():
  x, k = normal((4, 8, 8, 16), 6), normal((3, 3, 16, 24), 7, scale=0.1)
  dn = ('NHWC', 'HWIO', 'NHWC')
  y = quantize.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn,
                                    mode='int8')
  qx, sx = quantize.quantize(x, (1, 2, 3))  # Per example.
  qk, sk = quantize.quantize(k, (0, 1, 2))  # Per output channel.
  ref = jax.lax.conv_general_dilated(qx.astype(jnp.float32) * sx, qk.astype(jnp.float32) * sk,
                                     (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  fake = quantize.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn,
                                       mode='fake')
  np.testing.assert_allclose(fake, ref, rtol=1e-5, atol=1e-5)


def test_qat_gradient_is_straight_through():
  x = normal((5, 7), 8)
  c = normal((5, 7), 9)
  g = jax.grad(lambda x: (quantize.fake_quantize(x, (1,)) * c).sum())(x)
  np.testing.assert_array_equal(g, c)  # d round(x) / dx taken as 1, scale included.
  # Through a layer: the float layer's gradient, taken at the rounded operands.
  x, w = normal((6, 32), 10), normal((32, 5), 11)
  up = normal((6, 5), 12)
  gx, gw = jax.grad(lambda x, w: (quantize.dot(x, w, jnp.float32, mode='fake') * up).sum(),
                    argnums=(0, 1))(x, w)
  xq = quantize.fake_quantize(x, (1,))
  wq = quantize.fake_quantize(w, (0,))
  np.testing.assert_allclose(gx, up @ wq.T, rtol=1e-5)
  np.testing.assert_allclose(gw, xq.T @ up, rtol=1e-5)


def tiny_transformer(quant=''):
  cfg = model_lib.TransformerConfig(vocab_size=65, num_layers=2, num_heads=2, d_model=32,
                                    mlp_dim=128, seq_len=16, use_bias=True, quant=quant)
  return model_lib.Transformer(cfg)


def test_every_transformer_matmul_is_quantized_and_ptq_stays_close():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (4, 16)), jnp.int32)
  params = tiny_transformer().init(jax.random.key(0), tokens)
  ref = tiny_transformer().apply(params, tokens)
  out = tiny_transformer('int8').apply(params, tokens)
  err = float(jnp.abs(out - ref).max())
  assert 0 < err < 0.02 * float(jnp.abs(ref).max())
  # Each of the five matmul kinds goes through quantize.dot: counted on the jaxpr.
  jaxpr = str(jax.make_jaxpr(lambda p: tiny_transformer('int8').apply(p, tokens))(params))
  # qkv, out, wi, wo per block (2 blocks) and the tied head.
  assert jaxpr.count('preferred_element_type=int32') == 2 * 4 + 1


def test_the_text_classifiers_head_is_quantized_too():
  # Its [D, K] head was a float matmul, so an int8 export still ran one layer in float and QAT
  # never saw that layer's rounding.
  cfg = model_lib.TransformerConfig(vocab_size=65, num_layers=2, num_heads=2, d_model=32,
                                    mlp_dim=128, seq_len=16, causal=False)
  classifier = lambda quant: model_lib.Classifier(dataclasses.replace(cfg, quant=quant),
                                                  num_classes=3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 65, (4, 16)), jnp.int32)
  params = classifier('').init(jax.random.key(0), tokens)
  ref = classifier('').apply(params, tokens)
  out = classifier('int8').apply(params, tokens)
  assert out.shape == ref.shape == (4, 3) and out.dtype == jnp.float32
  assert 0 < float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  jaxpr = str(jax.make_jaxpr(lambda p: classifier('int8').apply(p, tokens))(params))
  assert jaxpr.count('preferred_element_type=int32') == 2 * 4 + 1  # Blocks' matmuls, head.
  # QAT rounds the head's operands as well (two per matmul).
  rounds = lambda quant: str(jax.make_jaxpr(lambda p: classifier(quant).apply(p, tokens))(
      params)).count(' stop_gradient ')  # Each fake_quantize has one; softmax has its own.
  assert rounds('fake') - rounds('') == 2 * (2 * 4 + 1)


def test_cnn_convs_and_denses_are_intercepted(monkeypatch):
  c = config_lib.get_config().model
  c.update(name='resnet20', num_classes=10, dtype='float32', width=0.5, dropout=0.0)
  model = cnn.build(c)
  x = normal((2, 32, 32, 3), 13)
  variables = model.init(jax.random.key(0), x, train=False)
  ref = model.apply(variables, x, train=False)
  fake = quantize.wrap_model(model, 'fake').apply(variables, x, train=False)
  int8 = quantize.wrap_model(model, 'int8').apply(variables, x, train=False)
  assert 0 < float(jnp.abs(int8 - ref).max()) < 0.05 * float(jnp.abs(ref).max())
  np.testing.assert_allclose(int8, fake, rtol=1e-4, atol=1e-4)  # Same integers, two ways.
  rounded = []
  real = quantize.quantize
  monkeypatch.setattr(quantize, 'quantize', lambda x, axes: rounded.append(x.shape) or real(x, axes))
  jaxpr = str(jax.make_jaxpr(
      lambda v: quantize.wrap_model(model, 'int8').apply(v, x, train=False))(variables))
  assert jaxpr.count('preferred_element_type=int32') == 1  # The Dense head.
  assert len(rounded) == 2 * (19 + 1)  # Both operands of the 19 convs and of the head.
  assert (3, 3, 3, 8) in rounded and (32, 10) in rounded  # The stem's kernel and the head's.


def lm_config(**overrides):
  c = config_lib.load(TINY_LM)
  # ~0.8M parameters, so that fixed checkpoint metadata does not hide the ratio.
  c.model.update(num_layers=4, num_heads=4, d_model=128, seq_len=64)
  c.train.update(steps=4, eval_every=0, checkpoint_every=4, log_every=2, batch_size=8)
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def cli(*args, module='lm.main'):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  run = str(tmp_path_factory.mktemp('run'))
  train.Trainer(lm_config(), run).run()
  int8, f32 = str(tmp_path_factory.mktemp('x') / 'int8'), str(tmp_path_factory.mktemp('x') / 'f32')
  reports = (quantize.export(run, int8), quantize.export(run, f32, 'float32'))
  return run, int8, f32, reports


def test_int8_checkpoint_is_about_a_quarter_of_the_float_one(exported):
  _, int8, f32, (r8, r32) = exported
  ratio = r8['bytes_on_disk'] / r32['bytes_on_disk']
  assert 0.2 < ratio < 0.3, ratio
  assert max(l['max_error_in_scales'] for l in r8['layers']) <= 0.5 + 1e-6
  # What is on disk: int8 weights and float32 scales, no optimizer state.
  mngr = ocp.CheckpointManager(os.path.join(int8, 'checkpoints'),
                               item_handlers=ocp.StandardCheckpointHandler())
  meta = mngr.item_metadata(mngr.latest_step())
  assert set(meta) == {'params', 'scales', 'model_state'}
  assert meta['params']['block_0']['attn']['qkv'].dtype == np.int8
  assert meta['params']['embedding'].dtype == np.int8
  assert meta['params']['norm_final']['scale'].dtype == np.float32
  assert tuple(meta['scales']['block_0']['attn']['qkv'].shape) == (1, 4, 3, 32)
  with open(os.path.join(int8, 'config.json')) as f:
    saved = json.load(f)['quant']
  assert saved == {'qat': False, 'int8': True, 'export': 'int8'}


def test_int8_export_evaluates_through_the_cli_with_the_float_keys(exported):
  run, int8, _, _ = exported
  float_eval = cli(f'--config={TINY_LM}', f'--workdir={run}', '--mode=eval')
  int8_eval = cli(f'--config={TINY_LM}', f'--workdir={int8}', '--mode=eval')
  assert float_eval.returncode == 0 and int8_eval.returncode == 0, int8_eval.stderr[-2000:]
  a = json.loads(float_eval.stdout.strip().splitlines()[-1])
  b = json.loads(int8_eval.stdout.strip().splitlines()[-1])
  assert set(a) == set(b) and 'eval/loss' in b
  assert a['eval/loss'] != b['eval/loss'] and abs(a['eval/loss'] - b['eval/loss']) < 0.01
  with open(os.path.join(int8, 'metrics.jsonl')) as f:
    assert json.loads(f.readlines()[-1])['eval/loss'] == b['eval/loss']


def test_int8_export_samples(exported):
  _, int8, _, _ = exported
  result = cli(f'--workdir={int8}', '--prompt=ROMEO:', '--max_new_tokens=20',
               '--temperature=0', module='lm.sample')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('ROMEO:') and len(result.stdout.rstrip('\n')) == 26


def test_an_export_is_not_trained_in_and_int8_is_not_trained(exported, tmp_path):
  _, int8, _, _ = exported
  result = cli(f'--config={TINY_LM}', f'--workdir={int8}')
  assert result.returncode == 2 and 'holds an int8 export of weights' in result.stderr
  result = cli(f'--config={TINY_LM}', f'--workdir={tmp_path / "r"}', '--config.quant.int8=True')
  assert result.returncode == 2 and 'quant.int8 is for evaluation' in result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]


def test_quantize_refuses_an_existing_output(exported):
  run, int8, _, _ = exported
  result = cli(f'--workdir={run}', f'--output={int8}', module='lm.quantize')
  assert result.returncode == 2
  assert result.stderr.strip() == f'error: --output {int8!r} exists and is not empty; pick a new directory'


_TRANSPOSE_MODEL = '''
import sys
import flax.linen as nn
from lm import cnn, main

class WithTranspose(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.ConvTranspose(4, (3, 3))(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

cnn.build = lambda model_cfg: WithTranspose()
sys.exit(main.run(['lm.main'] + sys.argv[1:]))
'''


def test_quantizing_an_unsupported_layer_is_one_line_and_exit_2(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-c', _TRANSPOSE_MODEL, f'--config={TINY_CNN}',
       f'--workdir={tmp_path / "run"}', '--config.quant.qat=True'],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert 'quantization does not support ConvTranspose layers (ConvTranspose_0)' in result.stderr
  assert not (tmp_path / 'run').exists()
