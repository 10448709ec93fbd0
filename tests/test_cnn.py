"""Image models: shapes, parameter counts, BatchNorm semantics and sharded-BN equivalence."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from lm import cnn
from lm import config as base
from lm.config import ConfigError

# Published sizes (He et al. 2016; Zagoruyko & Komodakis 2016; the TF tutorial's summary).
PARAMS = {
    'simple_cnn': (122_570, 0),
    'mlp': (402_250, 0),
    'resnet20': (0.27e6, 0.01),
    'resnet32': (0.46e6, 0.01),
    'resnet56': (0.85e6, 0.01),
    'resnet110': (1.7e6, 0.03),
    'preact_resnet18': (11.2e6, 0.01),
    'wrn16_4': (2.7e6, 0.02),
    'wrn28_10': (36.5e6, 0.01),
    'resnet9': (6.57e6, 0.01),
}


def _model_cfg(name, **overrides):
  c = base.get_config().model
  c.name = name
  for k, v in overrides.items():
    c[k] = v
  return c


def _abstract_init(model, batch=2):
  x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({'params': jax.random.key(0)}, x, train=False), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return nn.meta.unbox(variables), logits


@pytest.mark.parametrize('name', cnn.NAMES)
def test_every_model_has_published_size_and_logit_shape(name):
  variables, logits = _abstract_init(cnn.build(_model_cfg(name)))
  assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32)
  count = sum(p.size for p in jax.tree.leaves(variables['params']))
  expected, rel = PARAMS[name]
  assert abs(count - expected) <= rel * expected, (name, count)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert ('batch_stats' in variables) == (name not in ('simple_cnn', 'mlp'))


def test_bfloat16_computes_in_bf16_but_keeps_float32_params_and_logits():
  model = cnn.build(_model_cfg('resnet20', dtype='bfloat16'))
  variables, logits = _abstract_init(model)
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)),
                                                   train=False))(variables))
  assert 'bf16' in jaxpr


def test_width_and_num_classes_reach_the_model():
  variables, logits = _abstract_init(cnn.build(_model_cfg('resnet20', width=2,
                                                          num_classes=100)))
  assert logits.shape == (2, 100)
  assert variables['params']['Dense_0']['kernel'].shape == (128, 100)
  variables, _ = _abstract_init(cnn.build(_model_cfg('resnet20', width=0.5)))  # A fraction.
  assert variables['params']['Dense_0']['kernel'].shape == (32, 10)


@pytest.mark.parametrize('overrides, match', [
    ({'name': 'resnet18'}, 'resnet20'),
    ({'name': 'simple_cnn', 'width': 2}, 'width'),
    ({'name': 'resnet20', 'dropout': 0.3}, 'dropout'),
    ({'name': 'resnet20', 'dtype': 'float16'}, 'dtype'),
])
def test_bad_model_configs_raise_config_error(overrides, match):
  with pytest.raises(ConfigError, match=match):
    cnn.build(_model_cfg(**overrides))


def test_convs_name_logical_axes():
  model = cnn.build(_model_cfg('resnet20'))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                            train=False))
  specs = nn.get_partition_spec(boxed)['params']
  assert specs['Conv_0']['kernel'] == P(None, None, 'conv_in', 'conv_out')


def _init(model, x):
  # 'rbg' keys: threefry's random-number kernels take seconds to compile on CPU per shape.
  key = jax.random.key(0, impl='rbg')
  return nn.meta.unbox(jax.jit(lambda x: model.init(key, x, train=False))(x))


def _tiny_resnet():
  return cnn.CifarResNet(10, blocks=1, widths=(8, 16, 16))


def test_batch_norm_uses_batch_stats_in_train_and_running_stats_in_eval():
  model = _tiny_resnet()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 8, 8, 3)), jnp.float32)
  variables = _init(model, x)
  x_other = x.at[1:].set(np.random.default_rng(2).normal(size=(7, 8, 8, 3)))
  train_logits = jax.jit(lambda x: model.apply(variables, x, train=True,
                                               mutable=['batch_stats']))
  eval_logits = jax.jit(lambda x: model.apply(variables, x, train=False))

  (a, new_state), (b, _) = train_logits(x), train_logits(x_other)
  # In train mode example 0's logits depend on the rest of the batch; in eval they do not.
  assert not np.allclose(a[0], b[0], atol=1e-4)
  np.testing.assert_allclose(eval_logits(x)[0], eval_logits(x_other)[0], atol=1e-5)
  # Running mean: 0.9 * 0 + 0.1 * batch mean of the stem conv's output.
  stem = nn.Conv(8, (3, 3), padding=1, use_bias=False).apply(
      {'params': variables['params']['Conv_0']}, x)
  np.testing.assert_allclose(new_state['batch_stats']['BatchNorm_0']['mean'],
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  assert not np.allclose(new_state['batch_stats']['BatchNorm_0']['var'], 1.0)


def test_wrn_dropout_is_random_in_train_and_off_in_eval():
  model = cnn.PreActResNet(10, stem=4, widths=(8,), blocks=1, dropout=0.5)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
  variables = _init(model, x)

  @functools.partial(jax.jit, static_argnums=1)
  def run(key, train):
    if train:
      return model.apply(variables, x, train=True, rngs={'dropout': key},
                         mutable=['batch_stats'])[0]
    return model.apply(variables, x, train=False, rngs={'dropout': key})

  key0, key1 = jax.random.key(0, impl='rbg'), jax.random.key(1, impl='rbg')
  assert not np.allclose(run(key0, True), run(key1, True))
  np.testing.assert_array_equal(run(key0, False), run(key1, False))


def _loss_grads_stats(model, variables, x, y):
  def loss_fn(params):
    logits, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state
  (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  return loss, grads, state['batch_stats']


def test_batch_norm_over_a_batch_sharded_on_8_devices_matches_one_device():
  model = _tiny_resnet()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8, 8, 3)), jnp.float32)
  y = jnp.arange(16) % 10
  variables = _init(model, x)
  step = jax.jit(lambda v, x, y: _loss_grads_stats(model, v, x, y))

  one = step(*jax.device_put((variables, x, y), jax.devices()[0]))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  x8 = jax.device_put(x, NamedSharding(mesh, P('data')))
  y8 = jax.device_put(y, NamedSharding(mesh, P('data')))
  v8 = jax.device_put(variables, NamedSharding(mesh, P()))
  eight = step(v8, x8, y8)

  assert len(x8.sharding.device_set) == 8
  # Sharded BN statistics are a cross-device reduction: same numbers up to summation order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               one, eight)


def test_batch_norm_statistics_are_those_of_the_global_batch():
  """4 rows on each of 8 devices, each device's rows shifted by its own offset: the
  statistics BatchNorm normalises with (and keeps as running averages) are the whole batch's,
  computed here in numpy. Per-device statistics would differ (each slice has its own mean, so
  its variance is far below the global one); comparing 1 with 8 devices would not see that
  when the per-device code also runs on one device."""
  model = _tiny_resnet()
  rng = np.random.default_rng(3)
  offsets = np.repeat(np.arange(8.0), 4)[:, None, None, None]  # Device d's rows: + d.
  x = jnp.asarray(rng.normal(size=(32, 8, 8, 3)) + offsets, jnp.float32)
  variables = _init(model, x[:1])
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  x8 = jax.device_put(x, NamedSharding(mesh, P('data')))
  assert {len(s.data) for s in x8.addressable_shards} == {4}
  forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                             capture_intermediates=True))
  _, state = forward(jax.device_put(variables, NamedSharding(mesh, P())), x8)

  # The first BatchNorm sees the stem conv's output, recomputed here on one device.
  stem = np.asarray(nn.Conv(8, (3, 3), padding=1, use_bias=False).apply(
      {'params': variables['params']['Conv_0']}, x), np.float64)
  mean_C, var_C = stem.mean(axis=(0, 1, 2)), stem.var(axis=(0, 1, 2))
  stats = state['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], 0.1 * mean_C, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var_C, rtol=1e-4, atol=1e-5)
  normalised = (stem - mean_C) / np.sqrt(var_C + 1e-5)
  scale = np.asarray(variables['params']['BatchNorm_0']['scale'])
  bias = np.asarray(variables['params']['BatchNorm_0']['bias'])
  out = state['intermediates']['BatchNorm_0']['__call__'][0]
  np.testing.assert_allclose(out, normalised * scale + bias, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('size,channels,kernel,strides,padding', [
    (8, 3, 3, 1, 1),       # a stem: 3 input channels
    (8, 4, 3, 2, 1),       # a strided 3x3 conv on an even input: four phases
    (7, 4, 3, 2, 1),       # ... on an odd one
    (9, 2, 3, (2, 1), 1),  # different strides per axis
    (8, 4, 1, 2, 0),       # a 1x1 projection shortcut
    (6, 2, 5, 1, 2),       # a larger window
    (6, 2, 3, 1, 'VALID'),  # VALID: XLA's own rule
])
def test_conv_gradients_match_xla(size, channels, kernel, strides, padding):
  """The convs' custom kernel gradient (`cnn._kernel_grad`) equals XLA's, as does all else."""
  conv = nn.Conv(5, (kernel, kernel), strides=strides, padding=padding,
                 conv_general_dilated=cnn._conv_general_dilated)
  reference = conv.clone(conv_general_dilated=jax.lax.conv_general_dilated)
  x = jax.random.normal(jax.random.key(0), (3, size, size + 1, channels))
  params = conv.init(jax.random.key(1), x)
  dy = jax.random.normal(jax.random.key(2), conv.apply(params, x).shape)

  def grads(module):
    y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return y, *vjp(dy)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grads(conv), grads(reference))


def test_max_pool_2x2_matches_flax_and_routes_the_gradient_to_the_max():
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))  # an odd row is dropped, as VALID
  np.testing.assert_array_equal(cnn._max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  g_ours = jax.grad(lambda x: cnn._max_pool_2x2(x).sum())(x)
  g_flax = jax.grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)).sum())(x)
  np.testing.assert_array_equal(g_ours, g_flax)  # No ties in random normals.
