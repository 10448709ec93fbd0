"""Tests for lm/model.py's Classifier: padding, bidirectionality, the trunk it shares with the LM.

Shape key as in lm/model.py; K: classes.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from lm import config as config_lib
from lm import model as model_lib
from lm import sharding

TINY = model_lib.TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=16,
                                   mlp_dim=32, seq_len=12)
ENCODER = dataclasses.replace(TINY, causal=False)
HEAD = ('cls_head', 'cls_head_bias')


def _tokens(batch=2, length=8, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size)


def _hidden(model, variables, *args, **kwargs):
  """The final-norm hidden states [B, L, D] of either model."""
  _, state = model.apply(variables, *args, **kwargs, mutable=['intermediates'],
                         capture_intermediates=lambda m, _: m.name == 'norm_final')
  return state['intermediates']['norm_final']['__call__'][0]


def _flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in flat}


@pytest.mark.parametrize('pool, pos, causal', [
    ('mean', 'learned', False), ('cls', 'rope', False), ('last', 'learned', False),
    ('last', 'rope', True), ('mean', 'rope', True)])
def test_pad_tokens_masked_out_do_not_change_logits(pool, pos, causal):
  model = model_lib.Classifier(dataclasses.replace(TINY, pos=pos, causal=causal),
                               num_classes=3, pool=pool)
  tokens = _tokens(length=6)
  mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])  # Row 1 is already padded.
  longer = jnp.concatenate([tokens, _tokens(length=4, seed=1)], axis=1)  # Junk pad ids.
  longer_mask = jnp.concatenate([mask, jnp.zeros((2, 4), bool)], axis=1)

  @jax.jit
  def logits(rng):
    variables = model.init(rng, tokens, mask)
    return (model.apply(variables, tokens, mask), model.apply(variables, longer, longer_mask),
            model.apply(variables, longer))

  short, padded, unmasked = logits(jax.random.key(0))
  assert short.shape == (2, 3) and short.dtype == jnp.float32
  np.testing.assert_allclose(padded, short, atol=1e-6)
  # Without the mask the pad tokens must count, or the check above proves nothing.
  assert np.abs(unmasked - short).max() > 1e-4


@pytest.mark.parametrize('pos', ['learned', 'rope'])
def test_encoder_sees_later_tokens_and_causal_trunk_does_not(pos):
  tokens = _tokens()
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % TINY.vocab_size)
  encoder = model_lib.Classifier(dataclasses.replace(ENCODER, pos=pos), num_classes=3)
  causal = model_lib.Classifier(dataclasses.replace(TINY, pos=pos), num_classes=3)

  @jax.jit
  def hidden(rng):
    variables = encoder.init(rng, tokens)  # One tree fits both: causality has no parameters.
    return [_hidden(m, variables, t) for m in (encoder, causal) for t in (tokens, changed)]

  enc, enc_changed, dec, dec_changed = hidden(jax.random.key(0))
  assert np.abs(enc_changed[:, 0] - enc[:, 0]).max() > 1e-4
  np.testing.assert_allclose(dec_changed[:, :5], dec[:, :5], atol=1e-6)
  assert np.abs(dec_changed[:, 5:] - dec[:, 5:]).max() > 1e-4


def test_attention_row_without_valid_keys_is_zero_with_finite_grads():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 2, 4, 8))  # Each [B, H, L, Q].
  key_mask = jnp.array([[True, True, False, False], [False] * 4])

  def attend(q, k, v, causal):
    return model_lib._attend(q, k, v, jnp.float32, causal=causal, key_mask_BxS=key_mask)

  for causal in (False, True):
    out = attend(q, k, v, causal)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.abs(out[0]).min() > 0  # The row with valid keys is not zeroed with it.
    grads = jax.grad(lambda *a: (attend(*a, causal) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)
  # Row 0 sees keys 0 and 1 alone, however the padding's values move.
  moved = attend(q, k, v.at[:, :, 2:].add(5.0), False)
  np.testing.assert_allclose(moved[0], attend(q, k, v, False)[0], atol=1e-6)


@pytest.mark.parametrize('pool, causal', [('mean', False), ('cls', False), ('last', True)])
def test_fully_padded_row_gives_finite_logits_and_grads(pool, causal):
  model = model_lib.Classifier(dataclasses.replace(TINY, causal=causal), num_classes=3,
                               pool=pool)
  tokens = _tokens()
  mask = jnp.array([[True] * 8, [False] * 8])

  @jax.jit
  def logits_and_grads(rng):
    params = model.init(rng, tokens, mask)['params']
    forward = lambda p: (lambda y: (y.sum(), y))(model.apply({'params': p}, tokens, mask))
    return jax.grad(forward, has_aux=True)(params)

  grads, logits = logits_and_grads(jax.random.key(0))
  assert np.isfinite(logits).all()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('change', [
    {}, dict(pos='rope', use_bias=True, tie_embeddings=False, mlp='swiglu', norm='rmsnorm')])
def test_trunk_params_have_the_lms_paths_shapes_and_axes(change):
  cfg = dataclasses.replace(TINY, **change)
  tokens = _tokens()
  lm = _flat(jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                            tokens)['params'])
  classifier = model_lib.Classifier(dataclasses.replace(cfg, causal=False), num_classes=3)
  cls = _flat(jax.eval_shape(classifier.init, jax.random.key(0), tokens)['params'])
  lm_only = {p for p in lm if p in ('head', 'head_bias')}
  assert lm_only == ({'head', 'head_bias'} if change else set())
  assert set(cls) - set(lm) == set(HEAD)
  describe = lambda box: (box.value.shape, box.names)
  assert {p: describe(b) for p, b in cls.items() if p not in HEAD} == {
      p: describe(b) for p, b in lm.items() if p not in lm_only}
  assert describe(cls['cls_head']) == ((cfg.d_model, 3), ('embed', None))
  assert describe(cls['cls_head_bias']) == ((3,), (None,))


def test_lm_params_loaded_into_the_classifier_reproduce_the_lms_hidden_states():
  lm = model_lib.Transformer(TINY)
  classifier = model_lib.Classifier(TINY, num_classes=3, pool='last')
  tokens = _tokens()

  @jax.jit
  def run(rng):
    lm_params = lm.init(rng, tokens)['params']
    head = {k: v for k, v in classifier.init(jax.random.key(7), tokens)['params'].items()
            if k in HEAD}
    params = {**lm_params, **head}  # Loading by path: the LM's trunk, a fresh head.
    return (_hidden(lm, {'params': lm_params}, tokens),
            _hidden(classifier, {'params': params}, tokens),
            classifier.apply({'params': params}, tokens), nn.unbox(head))

  lm_hidden, cls_hidden, logits, head = run(jax.random.key(0))
  np.testing.assert_allclose(cls_hidden, lm_hidden, atol=1e-6)
  np.testing.assert_allclose(
      logits, lm_hidden[:, -1] @ head['cls_head'] + head['cls_head_bias'], atol=1e-5)


def test_sharded_on_eight_devices_matches_one_device():
  model = model_lib.Classifier(ENCODER, num_classes=3, pool='mean')
  tokens = _tokens(batch=8)
  mask = jnp.arange(8)[None, :] < jnp.arange(1, 9)[:, None]  # Row i has i + 1 tokens.
  init = lambda rng: model.init(rng, tokens, mask)['params']
  boxed = jax.eval_shape(init, jax.random.key(0))
  abstract = nn.unbox(boxed)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 2}))
  param_sh = sharding.logical_shardings(boxed, abstract, mesh)
  assert param_sh['block_0']['attn']['qkv'].spec == P('fsdp', 'tensor', None, None)
  assert param_sh['cls_head'].spec == P('fsdp', None)

  apply = lambda p, t, m: model.apply({'params': p}, t, m)
  unboxed_init = lambda rng: nn.unbox(init(rng))
  params = jax.jit(unboxed_init, out_shardings=param_sh)(jax.random.key(0))
  batch_sh = sharding.batch_sharding(mesh)
  sharded = jax.jit(apply, in_shardings=(param_sh, batch_sh, batch_sh),
                    out_shardings=sharding.replicated(mesh))(params, tokens, mask)
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):
    constrained = jax.jit(apply, in_shardings=(param_sh, batch_sh, batch_sh))(
        params, tokens, mask)
  one = jax.jit(apply)(jax.device_put(params, jax.devices()[0]), tokens, mask)
  assert one.shape == (8, 3)
  np.testing.assert_allclose(sharded, one, atol=1e-5)
  np.testing.assert_allclose(constrained, one, atol=1e-5)


def test_head_dropout_only_in_training():
  model = model_lib.Classifier(ENCODER, num_classes=3, head_dropout=0.5)
  tokens = _tokens()

  @jax.jit
  def outputs(rng):
    variables = model.init(rng, tokens)
    train = lambda seed: model.apply(variables, tokens, train=True,
                                     rngs={'dropout': jax.random.key(seed)})
    return model.apply(variables, tokens), model.apply(variables, tokens), train(1), train(2)

  eval_a, eval_b, train_a, train_b = outputs(jax.random.key(0))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(train_a - train_b).max() > 1e-4


def test_from_config_reads_the_model_fields():
  c = config_lib.get_config()
  c.model.update(causal=False, pool='cls', num_classes=4, head_dropout=0.1, dropout=0.2)
  model = model_lib.Classifier.from_config(c.model, vocab_size=30)
  assert (model.num_classes, model.pool, model.head_dropout) == (4, 'cls', 0.1)
  assert (model.config.causal, model.config.dropout, model.config.vocab_size) == (False, 0.2, 30)
  assert model_lib.TransformerConfig.from_config(config_lib.get_config().model, 30).causal


@pytest.mark.parametrize('fields, message', [
    (dict(pool='max'), "model.pool='max' is not one of mean, cls, last"),
    (dict(pool='cls'), 'model.pool=cls with model.causal=True'),
    (dict(causal=False, num_classes=1), 'model.num_classes=1 must be at least 2'),
    (dict(causal=False, head_dropout=1.0), r'model.head_dropout=1.0 must be in \[0, 1\)'),
])
def test_classifier_config_errors(fields, message):
  c = config_lib.get_config()
  c.model.update(**fields)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    model_lib.Classifier.from_config(c.model, vocab_size=30)
  assert '\n' not in str(e.value)


def test_language_model_refuses_bidirectional_attention():
  c = config_lib.get_config()
  c.model.causal = False
  cfg = model_lib.TransformerConfig.from_config(c.model, vocab_size=30)
  with pytest.raises(config_lib.ConfigError, match='model.causal=False') as e:
    model_lib.Transformer(cfg)
  assert '\n' not in str(e.value)


def test_learned_positions_refuse_a_longer_input():
  model = model_lib.Classifier(ENCODER, num_classes=3)
  with pytest.raises(ValueError, match='13 tokens do not fit the 12 learned positions'):
    jax.eval_shape(model.init, jax.random.key(0), _tokens(length=13))


def test_classifier_flops_hand_count():
  # d=16, f=32, 2 layers: 2 * (4*16*16 + 16*32 + 32*16) = 4096 block weights; per token
  # 6 * 4096 + attention 12 * 2 layers * 2 heads * 8 dims * 12 = 24576 + 4608; 12 tokens;
  # head 6 * 16 * 3. The vocabulary is only looked up: no 6 * V * D.
  assert model_lib.classifier_flops_per_example(TINY, 3) == 12 * (24576 + 4608) + 288
  assert model_lib.classifier_flops_per_example(TINY, 3, length=4) == (
      4 * (24576 + 12 * 2 * 2 * 8 * 4) + 288)
