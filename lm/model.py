"""Transformer (GPT-2 style, pre-norm) in flax.linen: a decoder-only LM and a text classifier.

Both models are one trunk (token and position embeddings, blocks, final norm) with a different
head: `Transformer` projects every position onto the vocabulary, `Classifier` pools positions
into class logits. The trunk's parameters have the same paths in both, so either one's
checkpoint can seed the other.

Shape key:
  B: batch        L: query length      S: key/value length (the cache length when decoding)
  D: d_model      H: heads             Q: head dim (D / H)
  F: MLP width    V: vocab size        T: 3 (query, key, value) or 2 (SwiGLU gate and value)
  K: classes

Every parameter carries logical axis names (mapped to mesh axes by lm/sharding.py) and float32
storage; activations are computed in `config.dtype`.

Performance notes (XLA:CPU; each choice is cheap or neutral on GPU/TPU):
  * Attention runs with heads as a major axis ([B, H, L, Q]), so its batched matmuls need no
    layout transposes; XLA:CPU transposes around `BTNH` einsums cost more than the matmuls.
  * q, k and v come from one fused [D, 3*H*Q] matmul (wider matmuls run nearer peak on CPU).
On GPU with a 16-bit dtype the attention goes through cuDNN's fused kernel instead, unless
padding masks it (the classifier) or a KV cache does (decoding); `attention` picks another.

GPU fast paths (fields of TransformerConfig):
  attention    'auto' (cuDNN where it runs, else the einsum path), 'cudnn' (an error where
               cuDNN cannot run: a CPU, or a 32-bit dtype), 'xla' (jax.nn.dot_product_attention's
               XLA implementation) or 'einsum'.
  remat        'none', 'dots' (keep each block's weight-matmul outputs, recompute the rest) or
               'full' (keep only each block's input).
  scan_layers  one `nn.scan` over the blocks: compile time stays flat with depth. Parameters
               are then stacked, `blocks/...` with a leading layer axis instead of
               `block_<i>/...`; `stack_layers`/`unstack_layers` convert between the two, and a
               run started from another (config.init) takes its source's setting.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import quantize
from lm.config import ConfigError

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model hyperparameters; build with `from_config`, vary with `dataclasses.replace`."""
  vocab_size: int
  num_layers: int
  num_heads: int
  d_model: int
  mlp_dim: int
  seq_len: int
  pos: str = 'learned'  # 'learned' or 'rope'.
  norm: str = 'layernorm'  # 'layernorm' or 'rmsnorm'; pre-norm either way.
  mlp: str = 'gelu'  # 'gelu' or 'swiglu'.
  use_bias: bool = False
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32  # Compute dtype; params are always float32.
  remat: str = 'none'  # 'none', 'dots' or 'full' (see the module docstring).
  causal: bool = True  # False: bidirectional attention, for an encoder (never the LM).
  attention: str = 'auto'  # 'auto', 'cudnn', 'xla' or 'einsum'.
  scan_layers: bool = False
  quant: str = ''  # Matmuls in int8: '' (off), 'fake' (QAT) or 'int8' (lm/quantize.py).

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'TransformerConfig':
    """Builds the config from `config.model`, raising ConfigError on bad values."""
    m = model_cfg
    if m.vocab_size:
      vocab_size = m.vocab_size
    for field in ('num_layers', 'num_heads', 'd_model', 'seq_len'):
      if getattr(m, field) <= 0:
        raise ConfigError(f'model.{field}={getattr(m, field)} must be positive')
    if vocab_size <= 0:
      raise ConfigError(f'vocab_size={vocab_size} must be positive')
    if m.d_model % m.num_heads:
      raise ConfigError(f'model.d_model={m.d_model} is not divisible by '
                        f'model.num_heads={m.num_heads}; pick sizes that divide')
    if m.pos == 'rope' and (m.d_model // m.num_heads) % 2:
      raise ConfigError(f'model.pos=rope needs an even head dim, got '
                        f'{m.d_model}/{m.num_heads}={m.d_model // m.num_heads}')
    if m.mlp_dim < 0:
      raise ConfigError(f'model.mlp_dim={m.mlp_dim} must be >= 0 (0 means 4 * d_model)')
    _check_choice('pos', m.pos, ('learned', 'rope'))
    _check_choice('norm', m.norm, ('layernorm', 'rmsnorm'))
    _check_choice('mlp', m.mlp, ('gelu', 'swiglu'))
    _check_choice('dtype', m.dtype, tuple(_DTYPES))
    # A run's config.json from before these fields (lm.sample reads it as saved) lacks them,
    # or has remat as a bool.
    attention = getattr(m, 'attention', cls.attention)
    scan_layers = getattr(m, 'scan_layers', cls.scan_layers)
    remat = {True: 'full', False: 'none'}.get(m.remat, m.remat)
    _check_choice('attention', attention, _ATTENTION)
    _check_choice('remat', remat, tuple(REMAT_POLICIES))
    if not 0.0 <= m.dropout < 1.0:
      raise ConfigError(f'model.dropout={m.dropout} must be in [0, 1)')
    return cls(
        vocab_size=vocab_size, num_layers=m.num_layers, num_heads=m.num_heads,
        d_model=m.d_model, mlp_dim=m.mlp_dim or 4 * m.d_model, seq_len=m.seq_len,
        pos=m.pos, norm=m.norm, mlp=m.mlp, use_bias=m.use_bias,
        tie_embeddings=m.tie_embeddings, dropout=m.dropout, dtype=_DTYPES[m.dtype],
        remat=remat, causal=m.causal, attention=attention, scan_layers=scan_layers)


_ATTENTION = ('auto', 'cudnn', 'xla', 'einsum')
# What a rematerialised block keeps for the backward pass ('none': no remat at all).
REMAT_POLICIES = {
    'none': None,
    # The outputs of matmuls against weights (no batch dimension): the attention scores and
    # the elementwise work are recomputed, the expensive projections are not.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def _check_choice(field, value, choices):
  if value not in choices:
    raise ConfigError(f'model.{field}={value!r} is not one of {", ".join(choices)}')


def flops_per_token(cfg: TransformerConfig) -> float:
  """Training FLOPs per token, as in PaLM appendix B: 6 * N + 12 * L * H * Q * T.

  N counts every matmul weight: the attention and MLP kernels of all layers and the output
  projection (the shared table when tied, counted once). Position embeddings, norms and biases
  are left out: they cost no matmul. 12 * L * H * Q * T is the attention's score and value
  matmuls over the full (unmasked) context T = seq_len, forward and backward.
  """
  n = _block_weights(cfg) + cfg.d_model * cfg.vocab_size
  return 6.0 * n + _attention_flops(cfg, cfg.seq_len)


def classifier_flops_per_example(cfg: TransformerConfig, num_classes: int,
                                 length: int = 0) -> float:
  """Training FLOPs of one `length`-token example (0: seq_len) through `Classifier`.

  The LM's per-token count without the vocabulary projection (the classifier only looks up
  the table), times the length, plus the head's D x K matmul once per example. Padding
  positions are counted: they are computed. Bidirectional attention costs what causal does
  here, since the causal count already assumes the full context.
  """
  length = length or cfg.seq_len
  per_token = 6.0 * _block_weights(cfg) + _attention_flops(cfg, length)
  return length * per_token + 6.0 * cfg.d_model * num_classes


def _block_weights(cfg: TransformerConfig) -> int:
  """Matmul weights of all blocks: attention q, k, v, out and the MLP kernels."""
  d, f = cfg.d_model, cfg.mlp_dim
  mlp_in = 2 * d * f if cfg.mlp == 'swiglu' else d * f
  return cfg.num_layers * (4 * d * d + mlp_in + f * d)


def _attention_flops(cfg: TransformerConfig, context: int) -> float:
  """Per query token: scores and weighted values over `context` keys, forward and backward."""
  return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def _param(module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _dense(x_BxLxI, w_IxO, dtype, out_dtype=None, quant=''):
  """x @ w as one 2-D [B*L, I] matmul; in int8 (per token and output channel) with `quant`.

  Contracting a single axis keeps the weight gradient a plain [I, O] matmul; with x 3-D it
  contracts (B, L) and XLA:CPU materialises transposed copies of the activations for it.
  """
  b, length, i = x_BxLxI.shape
  if quant:
    y = quantize.dot(x_BxLxI.reshape(b * length, i), w_IxO, dtype, out_dtype, mode=quant)
  else:
    y = jnp.dot(x_BxLxI.reshape(b * length, i), w_IxO.astype(dtype),
                preferred_element_type=out_dtype)
  return y.reshape(b, length, w_IxO.shape[1])


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


_RESIDUAL = ('act_batch', 'act_len', 'act_embed')
_HEADS = ('act_batch', 'act_heads', 'act_len', None)
_MLP = ('act_batch', 'act_len', 'act_mlp')
_normal = nn.initializers.normal


class Norm(nn.Module):
  """Pre-norm LayerNorm or RMSNorm; statistics in float32 whatever the compute dtype."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    x = x_BxLxD.astype(jnp.float32)
    if cfg.norm == 'layernorm':
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)
    y = y * _param(self, 'scale', nn.initializers.ones, (cfg.d_model,), ('norm',))
    if cfg.use_bias:
      y = y + _param(self, 'bias', nn.initializers.zeros, (cfg.d_model,), ('norm',))
    return y.astype(cfg.dtype)


def _rope(x_BxHxLxQ, positions_L):
  """Rotates each (first half, second half) pair of head features by position."""
  half = x_BxHxLxQ.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_LxQ2 = positions_L.astype(jnp.float32)[:, None] * freq[None, :]
  sin, cos = jnp.sin(angle_LxQ2), jnp.cos(angle_LxQ2)
  x1, x2 = jnp.split(x_BxHxLxQ.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxHxLxQ.dtype)


def _cudnn_runs(dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes these inputs: 16-bit, on a GPU, head dim 8k <= 128."""
  return (jax.default_backend() == 'gpu' and jnp.dtype(dtype).itemsize == 2 and
          head_dim % 8 == 0 and head_dim <= 128)


# Masked logits are finite: a row with every key masked then has equal logits, not NaN.
_MASKED = jnp.finfo(jnp.float32).min


def _attend(q_BxHxLxQ, k_BxHxSxQ, v_BxHxSxQ, dtype, *, causal: bool, key_mask_BxS=None,
            query_start=None, implementation: str = 'auto'):
  """Softmax attention on heads-major arrays.

  causal: query l, at absolute position query_start + l, sees the keys at positions up to its
  own; query_start is the cache index when decoding and None otherwise (queries and keys then
  both start at 0). key_mask_BxS: False at padding keys, which no query sees. A query that
  sees no key at all (a fully padded row) gets zeros, and finite gradients.
  implementation: 'auto', 'cudnn', 'xla' or 'einsum' (TransformerConfig.attention).
  """
  head_dim = q_BxHxLxQ.shape[-1]
  if implementation == 'cudnn' and not _cudnn_runs(dtype, head_dim):
    raise ConfigError(
        f'model.attention=cudnn needs a GPU, model.dtype bfloat16 or float16 and a head dim that '
        f'is a multiple of 8 up to 128 (here: {jax.default_backend()}, {jnp.dtype(dtype).name}, '
        f'head dim {head_dim}); use model.attention=auto to fall back where it cannot run')
  # cuDNN only where nothing but causality masks: how it treats a query with no valid key has
  # not been checked, so padding and decoding take the einsum path below.
  plain = key_mask_BxS is None and query_start is None
  if implementation in ('auto', 'cudnn') and plain and _cudnn_runs(dtype, head_dim):
    return _dot_product_attention(q_BxHxLxQ, k_BxHxSxQ, v_BxHxSxQ, None, causal, 'cudnn')
  if implementation == 'xla':
    # Causality alone goes as is_causal; anything else as one explicit mask.
    mask = None if plain else _mask(q_BxHxLxQ.shape[2], k_BxHxSxQ.shape[2], causal,
                                    key_mask_BxS, query_start)
    out_BxHxLxQ = _dot_product_attention(q_BxHxLxQ, k_BxHxSxQ, v_BxHxSxQ, mask,
                                         causal and plain, 'xla')
    if key_mask_BxS is not None:  # Zeros for a query that sees no key, as below.
      out_BxHxLxQ = out_BxHxLxQ * mask.any(axis=-1, keepdims=True).astype(out_BxHxLxQ.dtype)
    return out_BxHxLxQ
  scale = 1.0 / math.sqrt(q_BxHxLxQ.shape[-1])
  logits_BxHxLxS = jnp.einsum('bhlq,bhsq->bhls', q_BxHxLxQ * scale, k_BxHxSxQ,
                              preferred_element_type=jnp.float32)
  mask = _mask(q_BxHxLxQ.shape[2], k_BxHxSxQ.shape[2], causal, key_mask_BxS, query_start)
  if mask is not None:
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, _MASKED)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  if key_mask_BxS is not None:
    # A query with no valid key has equal logits everywhere: without this it would average the
    # padding's values. Elsewhere masked probabilities are already exactly 0.
    probs_BxHxLxS = jnp.where(mask, probs_BxHxLxS, 0.0)
  return jnp.einsum('bhls,bhsq->bhlq', probs_BxHxLxS.astype(dtype), v_BxHxSxQ)


def _mask(length: int, keys: int, causal: bool, key_mask_BxS, query_start):
  """True where a query may see a key, [B or 1, 1, L, S] (against [B, H, L, S]); None: all."""
  mask = None
  if causal:
    start = 0 if query_start is None else query_start
    mask = jnp.arange(keys)[None, :] <= (start + jnp.arange(length))[:, None]  # [L, S]
  if key_mask_BxS is not None:
    key_Bx1x1xS = key_mask_BxS[:, None, None, :]
    mask = key_Bx1x1xS if mask is None else mask & key_Bx1x1xS
  if mask is not None and mask.ndim == 2:
    mask = mask[None, None]
  return mask


def _dot_product_attention(q_BxHxLxQ, k_BxHxSxQ, v_BxHxSxQ, mask_Bx1xLxS, is_causal: bool,
                           implementation: str):
  """jax.nn.dot_product_attention, which takes [B, L, H, Q], on heads-major arrays."""
  to_blhq = lambda t: t.transpose(0, 2, 1, 3)
  out_BxLxHxQ = jax.nn.dot_product_attention(
      to_blhq(q_BxHxLxQ), to_blhq(k_BxHxSxQ), to_blhq(v_BxHxSxQ), mask=mask_Bx1xLxS,
      is_causal=is_causal, implementation=implementation)
  return out_BxLxHxQ.transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head self-attention, causal unless `config.causal` is False, with a KV cache."""
  config: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_L, key_mask_BxS=None):
    cfg = self.config
    b, length = x_BxLxD.shape[:2]
    d, h, q = cfg.d_model, cfg.num_heads, cfg.head_dim
    # q, k and v kernels side by side, heads major so a tensor-parallel split stays contiguous.
    w_DxHx3xQ = _param(self, 'qkv', _normal(0.02), (d, h, 3, q), ('embed', 'heads', None, 'kv'))
    qkv_BxLxHx3xQ = _dense(x_BxLxD, w_DxHx3xQ.reshape(d, h * 3 * q), cfg.dtype,
                           quant=cfg.quant).reshape(b, length, h, 3, q)
    if cfg.use_bias:
      b_Hx3xQ = _param(self, 'qkv_bias', nn.initializers.zeros, (h, 3, q), ('heads', None, 'kv'))
      qkv_BxLxHx3xQ = qkv_BxLxHx3xQ + b_Hx3xQ.astype(cfg.dtype)
    # Heads-major for the attention matmuls: one explicit transpose instead of many implicit.
    q_BxHxLxQ, k_BxHxLxQ, v_BxHxLxQ = (
        _constrain(t, _HEADS) for t in qkv_BxLxHx3xQ.transpose(3, 0, 2, 1, 4))
    if cfg.pos == 'rope':
      q_BxHxLxQ = _rope(q_BxHxLxQ, positions_L)
      k_BxHxLxQ = _rope(k_BxHxLxQ, positions_L)

    query_start = None
    if self.decode:
      k_BxHxLxQ, v_BxHxLxQ, query_start = self._update_cache(k_BxHxLxQ, v_BxHxLxQ)
    out_BxHxLxQ = _attend(q_BxHxLxQ, k_BxHxLxQ, v_BxHxLxQ, cfg.dtype, causal=cfg.causal,
                          key_mask_BxS=key_mask_BxS, query_start=query_start,
                          implementation=cfg.attention)
    out_BxLxHQ = out_BxHxLxQ.transpose(0, 2, 1, 3).reshape(b, length, h * q)

    init_out = _normal(0.02 / math.sqrt(2 * cfg.num_layers))
    wo_HxQxD = _param(self, 'out', init_out, (h, q, d), ('heads', 'kv', 'embed'))
    y_BxLxD = _dense(out_BxLxHQ, wo_HxQxD.reshape(h * q, d), cfg.dtype, quant=cfg.quant)
    if cfg.use_bias:
      y_BxLxD = y_BxLxD + _param(self, 'out_bias', nn.initializers.zeros, (d,),
                                 ('embed',)).astype(cfg.dtype)
    return y_BxLxD

  def _update_cache(self, k_BxHxLxQ, v_BxHxLxQ):
    """Writes this call's keys/values at the cache index; returns the whole cache and the
    index, the position of this call's first query (None when nothing is cached yet).

    The first call (from `init`) only creates the cache, sized by its input length.
    """
    is_initialized = self.has_variable('cache', 'cached_key')
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k_BxHxLxQ.shape, k_BxHxLxQ.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v_BxHxLxQ.shape,
                             v_BxHxLxQ.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return k_BxHxLxQ, v_BxHxLxQ, None
    length = k_BxHxLxQ.shape[2]
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxHxLxQ, (0, 0, i, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxHxLxQ, (0, 0, i, 0))
    index.value = i + length
    return cached_k.value, cached_v.value, i


class Mlp(nn.Module):
  """GELU or SwiGLU feed-forward block."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    d, f = cfg.d_model, cfg.mlp_dim
    h_BxLxF = self._in(x_BxLxD, 'wi')
    if cfg.mlp == 'swiglu':
      h_BxLxF = nn.silu(h_BxLxF) * self._in(x_BxLxD, 'wi_value')
    else:
      h_BxLxF = nn.gelu(h_BxLxF)
    h_BxLxF = _constrain(h_BxLxF, _MLP)
    init_out = _normal(0.02 / math.sqrt(2 * cfg.num_layers))
    wo_FxD = _param(self, 'wo', init_out, (f, d), ('mlp', 'embed'))
    y_BxLxD = _dense(h_BxLxF, wo_FxD, cfg.dtype, quant=cfg.quant)
    if cfg.use_bias:
      y_BxLxD = y_BxLxD + _param(self, 'wo_bias', nn.initializers.zeros, (d,),
                                 ('embed',)).astype(cfg.dtype)
    return y_BxLxD

  def _in(self, x_BxLxD, name):
    cfg = self.config
    w_DxF = _param(self, name, _normal(0.02), (cfg.d_model, cfg.mlp_dim), ('embed', 'mlp'))
    h_BxLxF = _dense(x_BxLxD, w_DxF, cfg.dtype, quant=cfg.quant)
    if cfg.use_bias:
      h_BxLxF = h_BxLxF + _param(self, name + '_bias', nn.initializers.zeros, (cfg.mlp_dim,),
                                 ('mlp',)).astype(cfg.dtype)
    return h_BxLxF


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: TransformerConfig
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_L, key_mask_BxL=None):
    cfg = self.config
    drop = nn.Dropout(cfg.dropout, deterministic=not self.train)
    h = Attention(cfg, decode=self.decode, name='attn')(Norm(cfg, name='norm_attn')(x_BxLxD),
                                                        positions_L, key_mask_BxL)
    x_BxLxD = _constrain(x_BxLxD + drop(h), _RESIDUAL)
    h = Mlp(cfg, name='mlp')(Norm(cfg, name='norm_mlp')(x_BxLxD))
    return _constrain(x_BxLxD + drop(h), _RESIDUAL)


class Trunk(nn.Module):
  """Base of both models: token and position embeddings, the blocks and the final norm.

  A base class rather than a submodule, so its parameters sit at the top of either model's
  tree (`embedding`, `pos_embedding`, `block_<i>/...`, `norm_final/...`) with the same shapes
  and logical axes: an LM checkpoint seeds a classifier, and back, by parameter path. With
  scan_layers the blocks are one `blocks/...` subtree, each array stacked over the layers
  (logical axis 'layers' first).
  """
  config: TransformerConfig

  def _encode(self, tokens_BxL, positions_L, key_mask_BxL, *, train: bool, decode: bool = False):
    """Final-norm hidden states [B, L, D], and the token table [V, D] for a tied head.

    key_mask_BxL is False at padding, which no position attends to; None when nothing is.
    """
    cfg = self.config
    d, v = cfg.d_model, cfg.vocab_size
    embedding_VxD = _param(self, 'embedding', _normal(0.02), (v, d), ('vocab', 'embed'))
    x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(cfg.dtype)
    if cfg.pos == 'learned':
      pos_SxD = _param(self, 'pos_embedding', _normal(0.02), (cfg.seq_len, d), (None, 'embed'))
      x_BxLxD = x_BxLxD + jnp.take(pos_SxD, positions_L, axis=0).astype(cfg.dtype)
    x_BxLxD = nn.Dropout(cfg.dropout, deterministic=not train)(x_BxLxD)
    x_BxLxD = _constrain(x_BxLxD, _RESIDUAL)

    block = Block
    if cfg.remat != 'none':
      # Under scan, CSE across iterations cannot undo the remat, so it need not be prevented.
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      blocks = block(cfg, train=train, decode=decode, name='blocks')
      x_BxLxD, _ = nn.scan(
          lambda module, x, positions, mask: (module(x, positions, mask), None),
          variable_axes={'params': 0, 'cache': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(blocks, x_BxLxD, positions_L,
                                                         key_mask_BxL)
    else:
      for i in range(cfg.num_layers):
        x_BxLxD = block(cfg, train=train, decode=decode, name=f'block_{i}')(
            x_BxLxD, positions_L, key_mask_BxL)
    return Norm(cfg, name='norm_final')(x_BxLxD), embedding_VxD


class Transformer(Trunk):
  """Token ids [B, L] -> next-token logits [B, L, V] in float32."""

  def __post_init__(self):
    if not self.config.causal:
      raise ConfigError('model.causal=False lets a language model see the tokens it predicts; '
                        'set model.causal=True (bidirectional is for a classifier)')
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxL, *, train: bool = False, decode: bool = False):
    cfg = self.config
    d, v = cfg.d_model, cfg.vocab_size
    positions_L = self._positions(tokens_BxL.shape[1], decode)
    x_BxLxD, embedding_VxD = self._encode(tokens_BxL, positions_L, None, train=train,
                                          decode=decode)
    if cfg.tie_embeddings:
      head_DxV = embedding_VxD.T
    else:
      head_DxV = _param(self, 'head', _normal(0.02), (d, v), ('embed', 'vocab'))
    logits_BxLxV = _dense(x_BxLxD, head_DxV, cfg.dtype, out_dtype=jnp.float32, quant=cfg.quant)
    if cfg.use_bias:
      logits_BxLxV = logits_BxLxV + _param(self, 'head_bias', nn.initializers.zeros, (v,),
                                           ('vocab',))
    return _constrain(logits_BxLxV, ('act_batch', 'act_len', 'act_vocab'))

  def _positions(self, length, decode):
    """Absolute positions of this call's tokens: the cache index onwards when decoding."""
    start = 0
    if decode:
      is_initialized = self.has_variable('cache', 'position')
      position = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
      if is_initialized:
        start = position.value
        position.value = start + length
    return start + jnp.arange(length)


_POOLS = ('mean', 'cls', 'last')


class Classifier(Trunk):
  """Token ids [B, L] and a mask (False at padding) -> class logits [B, K] in float32.

  pool: 'mean' averages the non-pad positions; 'cls' takes the first position (the data puts
  a [CLS] id there); 'last' takes the last non-pad position, the one that has seen the whole
  text when the trunk is causal (an LM fine-tuned into a classifier). The head's parameters,
  `cls_head` [D, K] and `cls_head_bias` [K], are the only ones the LM does not have.
  """
  num_classes: int
  pool: str = 'mean'
  head_dropout: float = 0.0  # On the pooled features; the trunk's dropout is config.dropout.

  def __post_init__(self):
    _check_choice('pool', self.pool, _POOLS)
    if self.num_classes < 2:
      raise ConfigError(f'model.num_classes={self.num_classes} must be at least 2')
    if not 0.0 <= self.head_dropout < 1.0:
      raise ConfigError(f'model.head_dropout={self.head_dropout} must be in [0, 1)')
    if self.pool == 'cls' and self.config.causal:
      raise ConfigError('model.pool=cls with model.causal=True pools a position that sees only '
                        'itself; set model.causal=False or model.pool=last')
    super().__post_init__()

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'Classifier':
    """Builds the classifier from `config.model`, raising ConfigError on bad values."""
    return cls(TransformerConfig.from_config(model_cfg, vocab_size),
               num_classes=model_cfg.num_classes, pool=model_cfg.pool,
               head_dropout=model_cfg.head_dropout)

  @nn.compact
  def __call__(self, tokens_BxL, token_mask_BxL=None, *, train: bool = False):
    """token_mask_BxL: True at real tokens, False at padding; None when nothing is padding."""
    cfg = self.config
    b, length = tokens_BxL.shape
    if cfg.pos == 'learned' and length > cfg.seq_len:
      # jnp.take would fill the missing positions with NaN.
      raise ValueError(f'{length} tokens do not fit the {cfg.seq_len} learned positions')
    x_BxLxD, _ = self._encode(tokens_BxL, jnp.arange(length), token_mask_BxL, train=train)
    if token_mask_BxL is None:
      token_mask_BxL = jnp.ones((b, length), bool)
    pooled_BxD = _pool(x_BxLxD, token_mask_BxL, self.pool)
    pooled_BxD = nn.Dropout(self.head_dropout, deterministic=not train,
                            name='head_dropout')(pooled_BxD)
    k = self.num_classes
    # Classes stay replicated: K is small, and often not divisible by the tensor axis.
    w_DxK = _param(self, 'cls_head', _normal(0.02), (cfg.d_model, k), ('embed', None))
    b_K = _param(self, 'cls_head_bias', nn.initializers.zeros, (k,), (None,))
    # Through _dense like every other matmul, so int8 and QAT (cfg.quant) cover the head too.
    logits_BxK = _dense(pooled_BxD.astype(cfg.dtype)[:, None], w_DxK, cfg.dtype,
                        out_dtype=jnp.float32, quant=cfg.quant)[:, 0] + b_K
    return _constrain(logits_BxK, ('act_batch', None))


class Encoder(Trunk):
  """The trunk alone, for models that put their own head on text (lm/fusion.py's text tower).

  Token ids [B, L] and a mask (False at padding) -> (pooled features [B, D] float32, final-norm
  hidden states [B, L, D]). Its parameters are the trunk's, at the paths the LM and
  `Classifier` give them, so either one's trunk seeds it.
  """
  pool: str = 'mean'

  def __post_init__(self):
    _check_choice('pool', self.pool, _POOLS)
    if self.pool == 'cls' and self.config.causal:
      raise ConfigError('model.pool=cls with model.causal=True pools a position that sees only '
                        'itself; set model.causal=False or model.pool=last')
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BxL, token_mask_BxL=None, *, train: bool = False):
    b, length = tokens_BxL.shape
    if self.config.pos == 'learned' and length > self.config.seq_len:
      raise ValueError(f'{length} tokens do not fit the {self.config.seq_len} learned positions')
    x_BxLxD, _ = self._encode(tokens_BxL, jnp.arange(length), token_mask_BxL, train=train)
    if token_mask_BxL is None:
      token_mask_BxL = jnp.ones((b, length), bool)
    return _pool(x_BxLxD, token_mask_BxL, self.pool), x_BxLxD


def _pool(x_BxLxD, mask_BxL, pool: str):
  """Each row's features [B, D] in float32, as a weighted sum over its positions."""
  b, length = mask_BxL.shape
  if pool == 'mean':
    valid_BxL = mask_BxL.astype(jnp.float32)
    # At least 1: a fully padded row pools to zeros, not 0 / 0.
    weights_BxL = valid_BxL / jnp.maximum(valid_BxL.sum(axis=1, keepdims=True), 1.0)
  else:
    # The first position, or the last valid one (the first in a fully padded row).
    index_B = (jnp.zeros((b,), jnp.int32) if pool == 'cls' else
               jnp.max(jnp.where(mask_BxL, jnp.arange(length), 0), axis=1))
    weights_BxL = jax.nn.one_hot(index_B, length, dtype=jnp.float32)
  return jnp.einsum('bld,bl->bd', x_BxLxD.astype(jnp.float32), weights_BxL)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled parameters (`block_<i>/...`) as scan_layers=True has them (`blocks/...`)."""
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  layers = [params[f'block_{i}'] for i in range(num_layers)]
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layers(params: dict) -> dict:
  """Scanned parameters (`blocks/...`, stacked) as scan_layers=False has them (`block_<i>`)."""
  out = {k: v for k, v in params.items() if k != 'blocks'}
  num_layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  for i in range(num_layers):
    out[f'block_{i}'] = jax.tree.map(lambda x: x[i], params['blocks'])
  return out


def init_cache(model: Transformer, batch_size: int, max_len: int):
  """An empty KV cache for `max_len` positions, without computing any parameters."""
  tokens = jnp.ones((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
