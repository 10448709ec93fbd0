"""Image + text classifiers: a CNN tower and a Transformer tower fused into class logits.

  image [B, H, W, C] -> image_tower, a headless lm/cnn.py model -> pooled [B, E], map [B, P, E]
  tokens [B, L]      -> text_tower, lm/model.py's Encoder       -> pooled [B, D], [B, L, D]
  fusion -> [B, F] -> head_hidden (ReLU, head dropout) -> head -> logits [B, K] float32

Fusions (`model.fusion`):
  concat      the two pooled feature vectors side by side.
  average     each projected to F, then averaged over the modalities an example has.
  gated       each projected to F through tanh and mixed by a per-feature gate
              sigmoid(W [image, text]): the gated multimodal unit (Arevalo et al. 2017).
  attention   each text token attends to the image's feature-map positions (multi-head, with
              learned position embeddings), is added to the attention's output and normed;
              then the real tokens are averaged.
  image_only, text_only   one tower and the same head; the other input is never read.

Modality dropout (training only): an example loses its image with probability p, else its text
with probability p, never both; a lost modality's features (pooled, map or tokens) are zeros.

Parameter paths: `image_tower/...` are the standalone CNN's minus its head (also in
'batch_stats'), `text_tower/{embedding, pos_embedding, block_<i>, norm_final}` the LM's and the
text Classifier's trunk, so a CIFAR run's or an LM's checkpoint can seed a tower by prefix;
`fusion/...`, `head_hidden` and `head` are new in every run.

Shape key: B batch, H W C image, P feature-map positions, E image feature width, L tokens,
D text width, F fusion width (model.fusion_dim), N heads, Q head dim (F / N), K classes.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import cnn
from lm import model as text_model
from lm.config import ConfigError

FUSIONS = ('concat', 'average', 'gated', 'attention', 'image_only', 'text_only')
_SINGLE = ('image_only', 'text_only')
_INIT = nn.initializers.lecun_normal()
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _dense(features: int, name: str, dtype, in_axis='embed', out_axis='mlp') -> nn.Dense:
  # The class axis (out_axis None) stays replicated: K rarely divides a mesh axis.
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_INIT, (in_axis, out_axis)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)))


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


def _constrain(x_BxF):
  return nn.with_logical_constraint(x_BxF, ('act_batch', None))


def masked_mean(x_BxLxF, mask_BxL):
  """The mean over each row's real positions; zeros for a row with none."""
  w_BxL = mask_BxL.astype(jnp.float32)
  w_BxL = w_BxL / jnp.maximum(w_BxL.sum(axis=1, keepdims=True), 1.0)
  return jnp.einsum('blf,bl->bf', x_BxLxF.astype(jnp.float32), w_BxL)


class Average(nn.Module):
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_BxE, text_BxD, keep_image_B, keep_text_B):
    h_image = _dense(self.width, 'image_in', self.dtype)(image_BxE) * keep_image_B[:, None]
    h_text = _dense(self.width, 'text_in', self.dtype)(text_BxD) * keep_text_B[:, None]
    present_Bx1 = jnp.maximum(keep_image_B + keep_text_B, 1.0)[:, None]
    return (h_image + h_text) / present_Bx1


class Gated(nn.Module):
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_BxE, text_BxD):
    h_image = jnp.tanh(_dense(self.width, 'image_in', self.dtype)(image_BxE))
    h_text = jnp.tanh(_dense(self.width, 'text_in', self.dtype)(text_BxD))
    both_Bx2F = jnp.concatenate([image_BxE, text_BxD], axis=-1)
    gate_BxF = nn.sigmoid(_dense(self.width, 'gate', self.dtype)(both_Bx2F))
    return gate_BxF * h_image + (1.0 - gate_BxF) * h_text


class CrossAttention(nn.Module):
  """Text tokens (queries) attend to image feature-map positions (keys and values)."""
  width: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxLxD, token_mask_BxL, map_BxPxE):
    f, n = self.width, self.num_heads
    q = f // n
    b, length, _ = tokens_BxLxD.shape
    p = map_BxPxE.shape[1]
    x_BxLxF = _dense(f, 'text_in', self.dtype)(tokens_BxLxD)
    pos_PxF = self.param('image_pos', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, 'mlp')), (p, f), jnp.float32)
    m_BxPxF = _dense(f, 'image_in', self.dtype)(map_BxPxE) + pos_PxF.astype(self.dtype)
    heads = lambda name, t: _dense(f, name, self.dtype, 'mlp', 'heads')(t).reshape(
        b, -1, n, q).transpose(0, 2, 1, 3)
    q_BxNxLxQ = heads('query', _layer_norm('norm_query', self.dtype)(x_BxLxF))
    k_BxNxPxQ = heads('key', m_BxPxF)
    v_BxNxPxQ = heads('value', m_BxPxF)
    logits_BxNxLxP = jnp.einsum('bnlq,bnpq->bnlp', q_BxNxLxQ / math.sqrt(q), k_BxNxPxQ,
                                preferred_element_type=jnp.float32)
    probs_BxNxLxP = jax.nn.softmax(logits_BxNxLxP, axis=-1).astype(self.dtype)
    out_BxLxF = jnp.einsum('bnlp,bnpq->blnq', probs_BxNxLxP, v_BxNxPxQ).reshape(b, length, f)
    y_BxLxF = x_BxLxF + _dense(f, 'out', self.dtype, 'heads', 'mlp')(out_BxLxF)
    y_BxLxF = _layer_norm('norm_out', self.dtype)(y_BxLxF)
    return masked_mean(y_BxLxF, token_mask_BxL)


class FusionClassifier(nn.Module):
  """(image [B, H, W, C], tokens [B, L], token mask [B, L]) -> class logits [B, K] float32.

  The towers are modules passed in, so their parameters sit under the field names
  `image_tower` and `text_tower`; a tower the fusion does not use is None.
  """
  num_classes: int
  fusion: str
  image_tower: nn.Module | None = None
  text_tower: nn.Module | None = None
  fusion_dim: int = 128
  num_heads: int = 4
  modality_dropout: float = 0.0
  head_dropout: float = 0.0
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'FusionClassifier':
    """Builds the model from `config.model`, raising ConfigError on bad values."""
    m = model_cfg
    if m.fusion not in FUSIONS:
      raise ConfigError(f'model.fusion={m.fusion!r} is unknown; use one of {", ".join(FUSIONS)}')
    if not 0.0 <= m.modality_dropout <= 0.5:
      raise ConfigError(f'model.modality_dropout={m.modality_dropout} must be in [0, 0.5] (an '
                        'example loses its image with that probability, else its text)')
    if m.modality_dropout and m.fusion in _SINGLE:
      raise ConfigError(f'model.modality_dropout={m.modality_dropout} needs two modalities but '
                        f'model.fusion={m.fusion}; set --config.model.modality_dropout=0')
    if m.num_classes < 2:
      raise ConfigError(f'model.num_classes={m.num_classes} must be at least 2')
    if m.fusion_dim <= 0:
      raise ConfigError(f'model.fusion_dim={m.fusion_dim} must be positive')
    if m.fusion == 'attention' and m.fusion_dim % m.num_heads:
      raise ConfigError(f'model.fusion_dim={m.fusion_dim} is not divisible by model.num_heads='
                        f'{m.num_heads} (the cross-attention heads); pick sizes that divide')
    if not 0.0 <= m.head_dropout < 1.0:
      raise ConfigError(f'model.head_dropout={m.head_dropout} must be in [0, 1)')
    if m.dtype not in _DTYPES:
      raise ConfigError(f'model.dtype={m.dtype!r} is not one of {", ".join(_DTYPES)}')
    image_tower = text_tower = None
    if m.fusion != 'text_only':
      # The tower's dropout is 0: model.dropout is the text tower's (only wrn28_10 has one).
      image_tower = cnn.make(m.image_model, 0, width=m.width, hidden=m.hidden, dtype=m.dtype,
                             field='model.image_model')
    if m.fusion != 'image_only':
      text_tower = text_model.Encoder(
          text_model.TransformerConfig.from_config(m, vocab_size), pool=m.pool)
    return cls(num_classes=m.num_classes, fusion=m.fusion, image_tower=image_tower,
               text_tower=text_tower, fusion_dim=m.fusion_dim, num_heads=m.num_heads,
               modality_dropout=m.modality_dropout, head_dropout=m.head_dropout,
               dtype=_DTYPES[m.dtype])

  def _keep(self, b: int, train: bool):
    """Per-example 1/0 flags [B] for image and text: modality dropout."""
    ones_B = jnp.ones((b,), jnp.float32)
    if not train or not self.modality_dropout:
      return ones_B, ones_B
    u_B = jax.random.uniform(self.make_rng('dropout'), (b,))
    p = self.modality_dropout
    return (u_B >= p).astype(jnp.float32), ((u_B < p) | (u_B >= 2 * p)).astype(jnp.float32)

  @nn.compact
  def __call__(self, image_BxHxWxC, tokens_BxL, token_mask_BxL, *, train: bool = False):
    b = tokens_BxL.shape[0]
    keep_image_B, keep_text_B = self._keep(b, train)
    if self.image_tower is not None:
      features = self.image_tower(image_BxHxWxC, train=train)
      image_BxE = features.pooled_BxD.astype(jnp.float32) * keep_image_B[:, None]
      map_BxHxWxE = features.map_BxHxWxC
      map_BxPxE = map_BxHxWxE.reshape(b, -1, map_BxHxWxE.shape[-1]).astype(jnp.float32)
      map_BxPxE = map_BxPxE * keep_image_B[:, None, None]
    if self.text_tower is not None:
      text_BxD, tokens_BxLxD = self.text_tower(tokens_BxL, token_mask_BxL, train=train)
      text_BxD = text_BxD * keep_text_B[:, None]
      tokens_BxLxD = tokens_BxLxD.astype(jnp.float32) * keep_text_B[:, None, None]

    f = self.fusion_dim
    if self.fusion == 'image_only':
      z_BxF = image_BxE
    elif self.fusion == 'text_only':
      z_BxF = text_BxD
    elif self.fusion == 'concat':
      z_BxF = jnp.concatenate([image_BxE, text_BxD], axis=-1)
    elif self.fusion == 'average':
      z_BxF = Average(f, self.dtype, name='fusion')(image_BxE, text_BxD, keep_image_B,
                                                    keep_text_B)
    elif self.fusion == 'gated':
      z_BxF = Gated(f, self.dtype, name='fusion')(image_BxE, text_BxD)
    else:
      z_BxF = CrossAttention(f, self.num_heads, self.dtype, name='fusion')(
          tokens_BxLxD, token_mask_BxL, map_BxPxE)
    h_BxF = nn.relu(_dense(f, 'head_hidden', self.dtype)(_constrain(z_BxF)))
    h_BxF = nn.Dropout(self.head_dropout, deterministic=not train, name='head_dropout')(h_BxF)
    logits_BxK = _dense(self.num_classes, 'head', self.dtype, 'mlp', None)(h_BxF)
    return _constrain(logits_BxK.astype(jnp.float32))
