"""Tests for lm/model.py: shapes, causality, logical axes, variants, config errors, FLOPs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lm import config as config_lib
from lm import model as model_lib

TINY = model_lib.TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=16,
                                   mlp_dim=32, seq_len=8)


def _tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size)


def _init(cfg, tokens):
  return jax.jit(model_lib.Transformer(cfg).init)(jax.random.key(0), tokens)


@pytest.mark.parametrize('pos', ['learned', 'rope'])
def test_logits_shape_dtype_and_causality(pos):
  cfg = dataclasses.replace(TINY, pos=pos)
  model = model_lib.Transformer(cfg)
  tokens = _tokens()
  t = 4
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % cfg.vocab_size)

  @jax.jit
  def both_logits(rng):
    variables = model.init(rng, tokens)
    return model.apply(variables, tokens), model.apply(variables, changed)

  logits, changed_logits = both_logits(jax.random.key(0))
  assert logits.shape == (2, 8, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(changed_logits[:, :t + 1], logits[:, :t + 1], atol=1e-6)
  # The change must be visible after t, or the check above proves nothing.
  assert np.abs(changed_logits[:, t + 1:] - logits[:, t + 1:]).max() > 1e-4


def test_every_param_has_logical_axes():
  cfg = dataclasses.replace(TINY, use_bias=True, tie_embeddings=False, mlp='swiglu')
  model = model_lib.Transformer(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), _tokens())['params']
  boxes = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  for box in boxes:
    assert len(box.names) == len(box.value.shape)
  specs = nn.get_partition_spec(params)
  assert specs['embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
  assert specs['head'] == jax.sharding.PartitionSpec('embed', 'vocab')
  block = specs['block_0']
  assert block['attn']['qkv'] == jax.sharding.PartitionSpec('embed', 'heads', None, 'kv')
  assert block['attn']['out'] == jax.sharding.PartitionSpec('heads', 'kv', 'embed')
  assert block['mlp']['wi'] == jax.sharding.PartitionSpec('embed', 'mlp')
  assert block['mlp']['wo'] == jax.sharding.PartitionSpec('mlp', 'embed')
  assert block['norm_attn']['scale'] == jax.sharding.PartitionSpec('norm')


def test_params_are_float32_and_init_follows_gpt2():
  cfg = dataclasses.replace(TINY, d_model=64, mlp_dim=256, dtype=jnp.bfloat16)
  params = nn.unbox(_init(cfg, _tokens())['params'])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  np.testing.assert_allclose(params['embedding'].std(), 0.02, rtol=0.1)
  # Residual output projections shrink by 1/sqrt(2 * num_layers) = 1/2.
  np.testing.assert_allclose(params['block_0']['mlp']['wo'].std(), 0.01, rtol=0.1)
  np.testing.assert_array_equal(params['norm_final']['scale'], 1.0)


@pytest.mark.parametrize('change', [
    dict(norm='rmsnorm'), dict(mlp='swiglu'), dict(tie_embeddings=False), dict(use_bias=True),
    dict(dtype=jnp.bfloat16), dict(pos='rope', norm='rmsnorm', mlp='swiglu')])
def test_variants_build_and_run(change):
  cfg = dataclasses.replace(TINY, **change)
  model = model_lib.Transformer(cfg)
  tokens = _tokens()

  @jax.jit
  def init_logits_and_grads(rng):
    params = model.init(rng, tokens)['params']
    forward = lambda p: (lambda logits: (logits.sum(), logits))(model.apply({'params': p}, tokens))
    return jax.grad(forward, has_aux=True)(params)

  grads, logits = init_logits_and_grads(jax.random.key(0))
  assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def _remat_policies(model, params, tokens) -> list:
  """The policy of every remat in the model's gradient graph, nested ones included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if 'policy' in eqn.params:
        found.append(eqn.params['policy'])
      for v in eqn.params.values():
        inner = getattr(v, 'jaxpr', v)
        if hasattr(inner, 'eqns'):
          walk(inner)

  walk(jax.make_jaxpr(jax.grad(lambda p: model.apply({'params': p}, tokens).sum()))(
      params).jaxpr)
  return found


@pytest.mark.parametrize('policy', ['dots', 'full'])
@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_give_the_same_loss_and_grads(policy, scan):
  tokens = _tokens()
  base = dataclasses.replace(TINY, scan_layers=scan)
  plain = model_lib.Transformer(base)
  remat = model_lib.Transformer(dataclasses.replace(base, remat=policy))

  params = plain.init(jax.random.key(0), tokens)['params']
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: (model.apply({'params': p}, tokens) ** 2).mean()))
  plain_loss, plain_grads = loss(plain)(params)
  remat_loss, remat_grads = loss(remat)(params)
  # The chosen policy is in the graph (else this would compare the plain model with itself).
  assert _remat_policies(remat, params, tokens) == [model_lib.REMAT_POLICIES[policy]] * (
      1 if scan else TINY.num_layers)
  assert not _remat_policies(plain, params, tokens)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain_grads, remat_grads)


def test_from_config_reads_a_config_saved_before_the_gpu_fields():
  # A run's config.json from before: remat a bool, no attention or scan_layers (lm.sample
  # builds the model from it as saved).
  saved = config_lib.get_config().model.to_dict()
  del saved['attention'], saved['scan_layers']
  for old, new in ((True, 'full'), (False, 'none')):
    cfg = model_lib.TransformerConfig.from_config(
        ml_collections.ConfigDict({**saved, 'remat': old}), vocab_size=65)
    assert (cfg.remat, cfg.attention, cfg.scan_layers) == (new, 'auto', False)


def _padding_mask(batch, length):
  mask = np.ones((batch, length), bool)
  mask[0, 5:] = False
  mask[1, :] = False  # A row with no valid key at all: zeros out, finite gradients.
  return jnp.asarray(mask)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('padded', [False, True])
def test_xla_attention_matches_einsum(causal, padded):
  b, h, length, q = 2, 2, 8, 8
  keys = jax.random.split(jax.random.key(1), 3)
  q_, k_, v_ = (jax.random.normal(k, (b, h, length, q)) for k in keys)
  mask = _padding_mask(b, length) if padded else None

  def attend(implementation):
    f = lambda q_, k_, v_: model_lib._attend(q_, k_, v_, jnp.float32, causal=causal,
                                             key_mask_BxS=mask, implementation=implementation)
    out, grads = jax.value_and_grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q_, k_, v_)
    return f(q_, k_, v_), grads

  einsum_out, einsum_grads = jax.jit(lambda: attend('einsum'))()
  xla_out, xla_grads = jax.jit(lambda: attend('xla'))()
  np.testing.assert_allclose(xla_out, einsum_out, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), xla_grads, einsum_grads)
  if padded:
    np.testing.assert_array_equal(xla_out[1], 0.0)


def test_xla_attention_decodes_like_einsum():
  cfg = dataclasses.replace(TINY, attention='xla')
  tokens = _tokens()
  params = _init(TINY, tokens)['params']
  outs = []
  for c in (TINY, cfg):
    model = model_lib.Transformer(c)
    cache = model_lib.init_cache(model, 2, TINY.seq_len)
    step = []
    for i in range(3):
      logits, mutated = model.apply({'params': params, 'cache': cache}, tokens[:, i:i + 1],
                                    decode=True, mutable=['cache'])
      cache = mutated['cache']
      step.append(logits)
    outs.append(np.concatenate(step, axis=1))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
  full = model_lib.Transformer(TINY).apply({'params': params}, tokens)
  np.testing.assert_allclose(outs[0], full[:, :3], atol=1e-5)


def test_every_attention_gives_the_same_logits_on_this_backend():
  tokens = _tokens()
  params = _init(TINY, tokens)['params']
  logits = {a: model_lib.Transformer(dataclasses.replace(TINY, attention=a)).apply(
      {'params': params}, tokens) for a in ('auto', 'xla', 'einsum')}
  np.testing.assert_allclose(logits['xla'], logits['einsum'], atol=1e-5)
  np.testing.assert_allclose(logits['auto'], logits['einsum'], atol=1e-5)


@pytest.mark.skipif(jax.default_backend() == 'gpu',
                    reason='on a GPU cuDNN runs; test_cudnn_attention_matches_einsum checks it')
def test_cudnn_attention_is_an_error_where_it_cannot_run():
  model = model_lib.Transformer(dataclasses.replace(TINY, attention='cudnn', d_model=32,
                                                    dtype=jnp.bfloat16))
  with pytest.raises(config_lib.ConfigError, match='model.attention=cudnn needs a GPU'):
    jax.eval_shape(model.init, jax.random.key(0), _tokens())


@pytest.mark.skipif(jax.default_backend() != 'gpu',
                    reason="cuDNN's fused attention needs an NVIDIA GPU; this backend is "
                    f'{jax.default_backend()}')
def test_cudnn_attention_matches_einsum():
  cfg = dataclasses.replace(TINY, num_heads=2, d_model=128, dtype=jnp.bfloat16, seq_len=64)
  tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)
  params = _init(cfg, tokens)['params']
  logits = {a: jax.jit(model_lib.Transformer(dataclasses.replace(cfg, attention=a)).apply)(
      {'params': params}, tokens) for a in ('cudnn', 'einsum')}
  np.testing.assert_allclose(logits['cudnn'], logits['einsum'], atol=0.05)


def test_scan_layers_gives_the_loss_and_grads_of_the_unrolled_model():
  tokens = _tokens()
  unrolled = model_lib.Transformer(TINY)
  scanned = model_lib.Transformer(dataclasses.replace(TINY, scan_layers=True))
  params = nn.unbox(_init(TINY, tokens)['params'])
  stacked = model_lib.stack_layers(params, TINY.num_layers)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), tokens)['params']
  assert jax.tree.map(lambda x: x.shape, nn.unbox(shapes)) == jax.tree.map(
      lambda x: x.shape, nn.unbox(stacked))
  assert nn.get_partition_spec(shapes)['blocks']['attn']['qkv'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'heads', None, 'kv')

  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: (model.apply({'params': p}, tokens) ** 2).mean()))
  unrolled_loss, unrolled_grads = loss(unrolled)(params)
  scanned_loss, scanned_grads = loss(scanned)(stacked)
  np.testing.assert_allclose(scanned_loss, unrolled_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               model_lib.unstack_layers(scanned_grads), unrolled_grads)
  assert jax.tree.structure(model_lib.unstack_layers(stacked)) == jax.tree.structure(params)


def test_scan_layers_decodes_like_the_unrolled_model():
  tokens = _tokens()
  params = nn.unbox(_init(TINY, tokens)['params'])
  variants = ((TINY, params),
              (dataclasses.replace(TINY, scan_layers=True),
               model_lib.stack_layers(params, TINY.num_layers)))
  outs = []
  for cfg, p in variants:
    model = model_lib.Transformer(cfg)
    cache = model_lib.init_cache(model, 2, TINY.seq_len)
    logits, _ = model.apply({'params': p, 'cache': cache}, tokens[:, :4], decode=True,
                            mutable=['cache'])
    outs.append(logits)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_dropout_only_in_training():
  model = model_lib.Transformer(dataclasses.replace(TINY, dropout=0.5))
  tokens = _tokens()

  @jax.jit
  def outputs(rng):
    variables = model.init(rng, tokens)
    train = lambda seed: model.apply(variables, tokens, train=True,
                                     rngs={'dropout': jax.random.key(seed)})
    return (model.apply(variables, tokens), model.apply(variables, tokens, train=False),
            train(1), train(2))

  eval_a, eval_b, train_a, train_b = outputs(jax.random.key(0))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(train_a - train_b).max() > 1e-3
  assert np.abs(train_a - eval_a).max() > 1e-3


def test_from_config_defaults():
  c = config_lib.get_config()
  cfg = model_lib.TransformerConfig.from_config(c.model, vocab_size=65)
  assert (cfg.vocab_size, cfg.d_model, cfg.mlp_dim, cfg.dtype) == (65, 128, 512, jnp.float32)
  with c.unlocked():
    c.model.dtype = 'bfloat16'
    c.model.vocab_size = 100
  cfg = model_lib.TransformerConfig.from_config(c.model, vocab_size=65)
  assert cfg.dtype == jnp.bfloat16 and cfg.vocab_size == 100


@pytest.mark.parametrize('field, value, message', [
    ('d_model', 130, 'model.d_model=130 is not divisible by model.num_heads=4'),
    ('pos', 'alibi', "model.pos='alibi' is not one of learned, rope"),
    ('norm', 'batchnorm', "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    ('mlp', 'relu', "model.mlp='relu' is not one of gelu, swiglu"),
    ('dtype', 'float64', "model.dtype='float64' is not one of"),
    ('num_layers', 0, 'model.num_layers=0 must be positive'),
    ('dropout', 1.0, 'model.dropout=1.0 must be in [0, 1)'),
])
def test_from_config_errors(field, value, message):
  c = config_lib.get_config()
  c.model[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[').replace(
      ')', r'\)').replace('(', r'\(')) as e:
    model_lib.TransformerConfig.from_config(c.model, vocab_size=65)
  assert '\n' not in str(e.value)


def test_flops_per_token_hand_count():
  # d=16, f=32, 2 layers, vocab 11, T=8: per layer 4*16*16 + 16*32 + 32*16 = 2048 weights,
  # N = 2 * 2048 + 16 * 11 = 4272; attention 12 * 2 layers * 2 heads * 8 dims * 8 = 3072.
  assert model_lib.flops_per_token(TINY) == 6 * 4272 + 3072
  # SwiGLU adds a second D x F input kernel per layer; untying does not change the count.
  swiglu = dataclasses.replace(TINY, mlp='swiglu', tie_embeddings=False)
  assert model_lib.flops_per_token(swiglu) == 6 * (4272 + 2 * 16 * 32) + 3072


def test_flops_per_token_matches_param_count():
  # Every counted weight is a parameter: matmul weights = all params - norms - positions.
  params = jax.eval_shape(model_lib.Transformer(TINY).init, jax.random.key(0), _tokens())
  total = sum(np.prod(p.shape) for p in jax.tree.leaves(nn.unbox(params['params'])))
  norms = (2 * TINY.num_layers + 1) * TINY.d_model
  positions = TINY.seq_len * TINY.d_model
  attention = 12 * TINY.num_layers * TINY.d_model * TINY.seq_len
  assert model_lib.flops_per_token(TINY) == 6 * (total - norms - positions) + attention


@pytest.mark.skipif(jax.default_backend() != 'gpu',
                    reason='cuDNN fused attention needs an NVIDIA GPU; elsewhere _attend always '
                           'takes the einsum path, which the other tests cover')
def test_cudnn_attention_equals_the_einsum_path_and_is_causal_in_bf16():
  """The kernel itself (test_cudnn_attention_matches_einsum compares whole models): really
  cuDNN's, causal, and equal to the einsum path in bf16."""
  b, h, length, q = 2, 4, 128, 64
  q_, k_, v_ = (jax.random.normal(key, (b, h, length, q), jnp.bfloat16)
                for key in jax.random.split(jax.random.key(0), 3))
  assert model_lib._cudnn_runs(jnp.bfloat16, q)
  attend = lambda impl: jax.jit(lambda q, k, v: model_lib._attend(
      q, k, v, jnp.bfloat16, causal=True, implementation=impl))
  fused, einsum = attend('cudnn'), attend('einsum')
  assert 'cudnn' in fused.lower(q_, k_, v_).as_text().lower()  # The fused kernel, really.
  assert 'cudnn' not in einsum.lower(q_, k_, v_).as_text().lower()
  out = np.asarray(fused(q_, k_, v_), np.float32)

  # Causal: keys and values after position t change nothing at or before t.
  t = 50
  k2 = k_.at[:, :, t + 1:].set(jax.random.normal(jax.random.key(1), k_[:, :, t + 1:].shape,
                                                 jnp.bfloat16))
  v2 = v_.at[:, :, t + 1:].multiply(-3)
  out2 = np.asarray(fused(q_, k2, v2), np.float32)
  np.testing.assert_allclose(out2[:, :, :t + 1], out[:, :, :t + 1], atol=1e-6)
  assert np.abs(out2[:, :, t + 1:] - out[:, :, t + 1:]).max() > 0.1
  np.testing.assert_allclose(out, np.asarray(einsum(q_, k_, v_), np.float32), atol=2e-2,
                             rtol=2e-2)
