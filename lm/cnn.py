"""Image classifiers for CIFAR-sized inputs, built from `config.model` by `build`.

Every model is called as `model.apply(variables, x_BxHxWxC, train=...)` and returns float32
logits [B, K]. `dtype` is the compute dtype; parameters stay float32. BatchNorm models keep
their running statistics in the 'batch_stats' collection; under `jax.jit` with the batch
sharded over the mesh, the batch mean inside BatchNorm is already a global (sync-BN) mean.

Shape key: B batch, H height, W width, C channels, K classes.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from lm.config import ConfigError
from lm.config import get_config as base_config

_BN_MOMENTUM = 0.9  # Flax's convention: running = 0.9 * running + 0.1 * batch.
_BN_EPSILON = 1e-5
# Kaiming-normal (He et al. 2015) with fan-out, as torchvision's ResNets initialise convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_DENSE_INIT = nn.initializers.lecun_normal()
# The seed models are trained as their tutorials train them, so they start as those did:
# Keras's Glorot-uniform for the TF CNN, PyTorch's default uniform(+-1/sqrt(fan_in)) for the MLP.
_KERAS_INIT = nn.initializers.glorot_uniform()
_TORCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
_DTYPES = ('float32', 'bfloat16')


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _phase_taps(k: int, s: int, lo: int, n_in: int, n_out: int):
  """Splits one spatial axis of a stride-s conv's kernel gradient into stride-1 pieces.

  Tap i of the kernel reads input row s*r + i - lo for output row r. The taps that read
  input phase e (rows e, e+s, ...) are i = first, first+s, ...; for each non-empty phase this
  yields (e, first, padding of dy for the stride-1 correlation of that phase with dy).
  """
  out = []
  for e in range(s):
    first = (lo + e) % s
    taps = len(range(first, k, s))
    if taps:
      t_max = (first - lo - e) // s + taps - 1
      out.append((e, first, (t_max, taps - 1 + len(range(e, n_in, s)) - n_out - t_max)))
  return out


def _kernel_grad(x_BxHxWxC, dy_BxPxQxO, window, strides, padding):
  """d loss / d kernel [kh, kw, C, O] of an NHWC conv, as stride-1 convs over the batch.

  XLA's own rule makes x the left operand, which XLA:CPU must first transpose to [C, H, W, B]
  (batch minor); it fuses that transpose with the BatchNorm/ReLU/residual chain that
  produced x and recomputes the chain with a cache-hostile read order. Here dy is the left
  operand ([O, P, Q, B]: a single materialised input) and x the kernel ([H, W, B, C], which
  keeps C minor and is cheap to form). A strided conv is split into its input phases (see
  `_phase_taps`), so no conv here is dilated (XLA:CPU runs those as slow generic loops). The
  window runs flipped, so each piece comes out reversed.
  """
  (sh, sw), c, o = strides, x_BxHxWxC.shape[-1], dy_BxPxQxO.shape[-1]
  rows, cols = (_phase_taps(k, s, lo, n_in, n_out) for k, s, (lo, _), n_in, n_out in zip(
      window, strides, padding, x_BxHxWxC.shape[1:3], dy_BxPxQxO.shape[1:3]))
  g_KxKxCxO = jnp.zeros((*window, c, o), dy_BxPxQxO.dtype)
  for eh, ih, pad_h in rows:
    for ew, iw, pad_w in cols:
      piece = lax.conv_general_dilated(dy_BxPxQxO, x_BxHxWxC[:, eh::sh, ew::sw], (1, 1),
                                       (pad_h, pad_w),
                                       dimension_numbers=('CHWN', 'IHWO', 'HWCN'))
      g_KxKxCxO = g_KxKxCxO.at[ih::sh, iw::sw].set(piece[::-1, ::-1])
  return g_KxKxCxO


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _conv_nhwc_fwd(x, kernel, strides, padding):
  return _conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_grad = jax.vjp(
      lambda x: lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC),
      x)
  kernel_grad = _kernel_grad(x, dy, kernel.shape[:2], strides, padding)
  return input_grad(dy)[0], kernel_grad.astype(kernel.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None):
  """lax.conv_general_dilated for nn.Conv: the same convolution, a faster kernel gradient.

  Plain NHWC convs whose output has ceil(input / stride) rows and columns ('same' padding)
  take `_kernel_grad`. The rest (VALID) keep XLA's rule: there the window of
  `_kernel_grad`'s convs would be larger than their input, and XLA:CPU rewrites such a conv
  into a slow generic loop. Accelerators keep XLA's rule everywhere: it is the form cuDNN's
  kernel-gradient (wgrad) kernels are matched from.
  """
  plain = (jax.default_backend() == 'cpu' and feature_group_count == 1 and precision is None and
           all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) and
           lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
           lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if plain and not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
    out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(
        lhs.shape[1:3], padding, rhs.shape[:2], window_strides)]
    if all(m == -(-n // s) for m, n, s in zip(out, lhs.shape[1:3], window_strides)):
      return _conv_nhwc(lhs, rhs, tuple(window_strides), padding)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision)


def _conv(features: int, kernel: int = 3, strides: int = 1, padding: Any = None,
          use_bias: bool = False, dtype: Any = jnp.float32, init=_CONV_INIT) -> nn.Conv:
  # Explicit symmetric padding (k // 2 per side) as in the papers' code; Flax's 'SAME' pads
  # stride-2 convs on one side only.
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=kernel // 2 if padding is None else padding, use_bias=use_bias,
                 dtype=dtype, conv_general_dilated=_conv_general_dilated,
                 kernel_init=nn.with_logical_partitioning(
                     init, (None, None, 'conv_in', 'conv_out')))


def _dense(features: int, out_axis: str | None = None, use_bias: bool = True,
           dtype: Any = jnp.float32, init=_DENSE_INIT) -> nn.Dense:
  # The class axis stays replicated: 10 or 100 classes rarely divide a mesh axis.
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=nn.with_logical_partitioning(init, ('embed', out_axis)))


def _batch_norm(train: bool, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                      epsilon=_BN_EPSILON, dtype=dtype)


def _global_avg_pool(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
  return x_BxHxWxC.mean(axis=(1, 2))


def _max_pool_2x2(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
  """nn.max_pool(x, (2, 2), strides=(2, 2)) (VALID: an odd last row or column is dropped).

  Written as a reshape and a max because the gradient of a reduce_window max lowers to
  select-and-scatter, which XLA:CPU runs several times slower than this compare-and-select.
  The forward pass is identical; where two inputs of a window tie for the max, this gradient
  is shared between them instead of going to the first (both are valid subgradients).
  """
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SimpleCNN(nn.Module):
  """The TensorFlow CNN tutorial's net: 3 VALID 3x3 convs, 2 max pools, 2 dense layers."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    del train  # No dropout or BatchNorm.
    x = x_BxHxWxC.astype(self.dtype)
    for features in (32, 64):
      x = nn.relu(_conv(features, padding='VALID', use_bias=True, dtype=self.dtype,
                        init=_KERAS_INIT)(x))
      x = _max_pool_2x2(x)
    x = nn.relu(_conv(64, padding='VALID', use_bias=True, dtype=self.dtype, init=_KERAS_INIT)(x))
    x_BxD = x.reshape(x.shape[0], -1)
    x_BxD = nn.relu(_dense(64, 'mlp', dtype=self.dtype, init=_KERAS_INIT)(x_BxD))
    return _dense(self.num_classes, dtype=self.dtype, init=_KERAS_INIT)(x_BxD).astype(
        jnp.float32)


class MLP(nn.Module):
  """Flattened pixels through ReLU hidden layers."""
  num_classes: int
  hidden: Sequence[int] = (128, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    del train
    x_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(self.dtype)
    for features in self.hidden:
      x_BxD = nn.relu(_dense(features, 'mlp', dtype=self.dtype, init=_TORCH_INIT)(x_BxD))
    return _dense(self.num_classes, dtype=self.dtype, init=_TORCH_INIT)(x_BxD).astype(
        jnp.float32)


def _shortcut_a(x_BxHxWxC: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
  """He et al. 2016 option A: subsample, then zero-pad the new channels (no parameters)."""
  x = x_BxHxWxC[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
  """Post-activation basic block (conv-BN-ReLU-conv-BN, add, ReLU) with option-A shortcut."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    y = _conv(self.features, strides=self.strides, dtype=self.dtype)(x_BxHxWxC)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    y = _conv(self.features, dtype=self.dtype)(y)
    y = _batch_norm(train, self.dtype)(y)
    shortcut = x_BxHxWxC
    if self.strides != 1 or x_BxHxWxC.shape[-1] != self.features:
      shortcut = _shortcut_a(x_BxHxWxC, self.features, self.strides)
    return nn.relu(shortcut + y)


class CifarResNet(nn.Module):
  """He et al. 2016's CIFAR ResNet: a 3x3 stem, 3 stages of `blocks` basic blocks, avg pool.

  Depth is 6 * blocks + 2 (ResNet-20: blocks=3).
  """
  num_classes: int
  blocks: int
  widths: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    x = _conv(self.widths[0], dtype=self.dtype)(x_BxHxWxC.astype(self.dtype))
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    for stage, features in enumerate(self.widths):
      for block in range(self.blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.dtype)(x, train=train)
    x_BxC = _global_avg_pool(x)
    return _dense(self.num_classes, dtype=self.dtype)(x_BxC).astype(jnp.float32)


class PreActBlock(nn.Module):
  """Pre-activation block (He et al. 2016b): BN-ReLU-conv twice, 1x1 projection on a change.

  Dropout between the convs is the Wide ResNet variant (Zagoruyko & Komodakis 2016).
  """
  features: int
  strides: int = 1
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    y = nn.relu(_batch_norm(train, self.dtype)(x_BxHxWxC))
    shortcut = x_BxHxWxC
    if self.strides != 1 or x_BxHxWxC.shape[-1] != self.features:
      # The projection sees the pre-activated input, as in the authors' code.
      shortcut = _conv(self.features, kernel=1, strides=self.strides, dtype=self.dtype)(y)
    y = _conv(self.features, strides=self.strides, dtype=self.dtype)(y)
    y = nn.relu(_batch_norm(train, self.dtype)(y))
    if self.dropout > 0:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _conv(self.features, dtype=self.dtype)(y)
    return shortcut + y


class PreActResNet(nn.Module):
  """A 3x3 stem, stages of pre-activation blocks, a final BN-ReLU, avg pool and a classifier.

  Pre-activation ResNet-18: stem 64, widths (64, 128, 256, 512), 2 blocks per stage.
  WRN-28-10: stem 16, widths (160, 320, 640), 4 blocks per stage; WRN-16-4: (64, 128, 256), 2.
  """
  num_classes: int
  stem: int
  widths: Sequence[int]
  blocks: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    x = _conv(self.stem, dtype=self.dtype)(x_BxHxWxC.astype(self.dtype))
    for stage, features in enumerate(self.widths):
      for block in range(self.blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(features, strides, self.dropout, self.dtype)(x, train=train)
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    x_BxC = _global_avg_pool(x)
    return _dense(self.num_classes, dtype=self.dtype)(x_BxC).astype(jnp.float32)


class ConvBN(nn.Module):
  """3x3 conv, BatchNorm, ReLU: ResNet-9's only building block."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    x = _conv(self.features, dtype=self.dtype)(x_BxHxWxC)
    return nn.relu(_batch_norm(train, self.dtype)(x))


class ResNet9(nn.Module):
  """David Page's DAWNBench ResNet-9 ("How to train your ResNet", myrtle.ai 2018).

  prep ConvBN(64); layer1 ConvBN(128), max pool, + residual of two ConvBN(128); layer2
  ConvBN(256), max pool; layer3 ConvBN(512), max pool, + residual of two ConvBN(512); global
  max pool; bias-free linear; logits scaled by 0.125. This is the net airbench grew out of,
  not airbench94 itself (which adds a whitening stem, narrower layers and other tricks).
  """
  num_classes: int
  widths: Sequence[int] = (64, 128, 256, 512)
  logit_scale: float = 0.125
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    prep, w1, w2, w3 = self.widths
    x = ConvBN(prep, self.dtype)(x_BxHxWxC.astype(self.dtype), train=train)
    for features, residual in ((w1, True), (w2, False), (w3, True)):
      x = ConvBN(features, self.dtype)(x, train=train)
      x = _max_pool_2x2(x)
      if residual:
        y = ConvBN(features, self.dtype)(x, train=train)
        x = x + ConvBN(features, self.dtype)(y, train=train)
    x_BxC = x.max(axis=(1, 2))
    logits = _dense(self.num_classes, use_bias=False, dtype=self.dtype)(x_BxC)
    return (logits * self.logit_scale).astype(jnp.float32)


_RESNET_DEPTHS = {'resnet20': 20, 'resnet32': 32, 'resnet56': 56, 'resnet110': 110}
# Wide ResNets (depth 6 * blocks + 4, widths 16k, 32k, 64k): name -> (blocks per stage, k).
_WIDE = {'wrn16_4': (2, 4), 'wrn28_10': (4, 10)}
NAMES = ('simple_cnn', 'mlp', *_RESNET_DEPTHS, 'preact_resnet18', *_WIDE, 'resnet9')
_HAS_WIDTH = ('resnet20', 'resnet32', 'resnet56', 'resnet110', 'preact_resnet18', 'resnet9')


def _check(model_cfg) -> None:
  if model_cfg.name not in NAMES:
    raise ConfigError(f'unknown image model {model_cfg.name!r}; set --config.model.name to one '
                      f'of {", ".join(NAMES)}')
  if model_cfg.dtype not in _DTYPES:
    raise ConfigError(f'model.dtype {model_cfg.dtype!r} is not supported; use one of '
                      f'{", ".join(_DTYPES)}')
  if model_cfg.width != 1 and model_cfg.name not in _HAS_WIDTH:
    raise ConfigError(f'model {model_cfg.name!r} has no width multiplier; set model.width=1 '
                      f'(it applies to {", ".join(_HAS_WIDTH)})')
  if model_cfg.width <= 0:
    raise ConfigError(f'model.width must be positive, got {model_cfg.width}')
  hidden = tuple(model_cfg.hidden)
  if not hidden or not all(isinstance(w, int) and w > 0 for w in hidden):
    raise ConfigError(f'model.hidden={model_cfg.hidden!r} must be one or more positive widths, '
                      'e.g. --config.model.hidden="(512, 256)"')
  if hidden != tuple(base_config().model.hidden) and model_cfg.name != 'mlp':
    raise ConfigError(f'model {model_cfg.name!r} has no hidden-width list; leave model.hidden '
                      'at its default (it applies to mlp)')
  if model_cfg.dropout > 0 and model_cfg.name not in _WIDE:
    raise ConfigError(f'model {model_cfg.name!r} has no dropout; set model.dropout=0 '
                      f'(only {", ".join(_WIDE)} use it)')


def build(model_cfg) -> nn.Module:
  """The image model `model_cfg.name` names (see NAMES), with `num_classes` outputs."""
  _check(model_cfg)
  name, k = model_cfg.name, model_cfg.num_classes
  dtype = jnp.dtype(model_cfg.dtype)

  def scaled(widths):
    return tuple(max(1, round(w * model_cfg.width)) for w in widths)

  if name == 'simple_cnn':
    return SimpleCNN(k, dtype=dtype)
  if name == 'mlp':
    return MLP(k, hidden=tuple(model_cfg.hidden), dtype=dtype)
  if name in _RESNET_DEPTHS:
    return CifarResNet(k, blocks=(_RESNET_DEPTHS[name] - 2) // 6,
                       widths=scaled((16, 32, 64)), dtype=dtype)
  if name == 'preact_resnet18':
    return PreActResNet(k, stem=scaled((64,))[0], widths=scaled((64, 128, 256, 512)),
                        blocks=2, dtype=dtype)
  if name in _WIDE:
    blocks, widen = _WIDE[name]
    return PreActResNet(k, stem=16, widths=(16 * widen, 32 * widen, 64 * widen), blocks=blocks,
                        dropout=model_cfg.dropout, dtype=dtype)
  return ResNet9(k, widths=scaled((64, 128, 256, 512)), dtype=dtype)
