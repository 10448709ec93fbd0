r"""int8 quantization: post-training (PTQ), quantization-aware training (QAT), int8 checkpoints.

  python -m lm.quantize --workdir=/tmp/dense --output=/tmp/dense_int8   # int8 weights + scales
  python -m lm.main --mode=eval --config=<its experiment> --workdir=/tmp/dense_int8
  python -m lm.sample --workdir=/tmp/dense_int8 --prompt="ROMEO:"

Numbers are symmetric int8 in [-127, 127], x ~ q * scale:
  weights      per output channel, scale = max |w| over the axes the matmul contracts / 127;
  activations  dynamic, per token (a row of a Dense or Einsum input) or per example (a Conv
               input), scale = max |x| over that row or example / 127.
Modes (a model runs in one of them):
  'int8'  config.quant.int8: int8 x int8 -> int32 matmuls, rescaled in float32. Convs multiply
          the same int8 values in float32 instead, because XLA:CPU's int8 convolution is a
          generic loop 12x slower than its float one; products and sums of int8 values are
          exact in float32 while kh * kw * Cin * 127^2 < 2^24 (Cin <= 115 for 3x3), so the
          result is the int8 result there and within float rounding of it beyond.
  'fake'  config.quant.qat: the same rounding, dequantized in float, with a straight-through
          gradient (the rounding's gradient taken as the identity): QAT.
Where: the Transformer's matmuls (lm/model.py `_dense`, TransformerConfig.quant; the text
classifier's head included) and every flax nn.Conv / nn.Dense of the image models, through a
flax method interceptor (`Intercepted`) that leaves lm/cnn.py alone. Other matmul layer
types (nn.Einsum, nn.DenseGeneral, nn.ConvTranspose, nn.ConvLocal) are refused rather than
silently left in float. Not quantized: embedding lookups, norms, attention's score and value
products.

An int8 checkpoint holds the weights only (no optimizer state): every parameter of 2+ axes as
int8 with one float32 scale per output channel (per row for embeddings, which serve as the
tied output projection), the rest (biases, norms, BatchNorm statistics) in float32. Loading
dequantizes q * scale; the 'int8' model re-quantizes those exactly (the maximum of each channel
is 127 * scale), so stored and computed integers agree.
"""

import dataclasses
import functools
import json
import os
import shutil
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lm import cli
from lm.config import ConfigError

_QMAX = 127.0
# Matmul layers we cannot quantize: refused, so no layer is silently left in float.
_UNSUPPORTED = (nn.Einsum, nn.DenseGeneral, nn.ConvTranspose, nn.ConvLocal)
_EMBEDDINGS = ('embedding', 'pos_embedding')


def mode(quant_cfg) -> str:
  """The mode a model runs in under config.quant: '', 'fake' or 'int8'."""
  if quant_cfg.qat and quant_cfg.int8:
    raise ConfigError('quant.qat and quant.int8 are exclusive: train with quant.qat=True, then '
                      'write the int8 checkpoint with python -m lm.quantize')
  return 'int8' if quant_cfg.int8 else 'fake' if quant_cfg.qat else ''


def quantize(x, reduce_axes):
  """(int8 values, float32 scale with the reduced axes kept as 1): symmetric absmax."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True) / _QMAX
  scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero channel (pruned) stays zero.
  return jnp.clip(jnp.round(x / scale), -_QMAX, _QMAX).astype(jnp.int8), scale


def fake_quantize(x, reduce_axes):
  """x rounded onto its int8 grid, with the identity as gradient (straight-through)."""
  q, scale = quantize(x, reduce_axes)
  rounded = (q.astype(jnp.float32) * scale).astype(x.dtype)
  return x + lax.stop_gradient(rounded - x)


def _free(ndim, contracting):
  return tuple(a for a in range(ndim) if a not in contracting)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                mode: str, dot=lax.dot_general, **kwargs):
  """lax.dot_general with lhs per row (its free axes) and rhs per output channel in int8."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    raise ConfigError('quantization supports matmuls without batch axes (Dense, Einsum over '
                      'weights); this one has batch axes')
  lc, rc = tuple(lc), tuple(rc)
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  if mode == 'fake':
    return dot(fake_quantize(lhs, lc), fake_quantize(rhs, rc), dimension_numbers,
               precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  q_lhs, s_lhs = quantize(lhs, lc)
  q_rhs, s_rhs = quantize(rhs, rc)
  y = lax.dot_general(q_lhs, q_rhs, dimension_numbers, preferred_element_type=jnp.int32)
  # Output axes: lhs's free axes, then rhs's; each scale broadcasts over the other's.
  lhs_free, rhs_free = _free(lhs.ndim, lc), _free(rhs.ndim, rc)
  s_lhs = s_lhs.reshape([lhs.shape[a] for a in lhs_free] + [1] * len(rhs_free))
  s_rhs = s_rhs.reshape([1] * len(lhs_free) + [rhs.shape[a] for a in rhs_free])
  return (y.astype(jnp.float32) * s_lhs * s_rhs).astype(out_dtype)


def dot(x_NxI, w_IxO, dtype, out_dtype=None, *, mode: str):
  """x @ w for lm/model.py's `_dense` in `mode` ('fake' or 'int8')."""
  return dot_general(x_NxI, w_IxO.astype(dtype), (((1,), (0,)), ((), ())),
                     preferred_element_type=out_dtype, mode=mode)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, *, mode: str,
                         conv=lax.conv_general_dilated):
  """`conv` (the layer's own convolution) with lhs per example and rhs per output channel in
  int8; see the module docstring for why 'int8' multiplies the integers in float32."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_axes = tuple(a for a in range(lhs.ndim) if a != dn.lhs_spec[0])  # All but batch.
  rhs_axes = tuple(a for a in range(rhs.ndim) if a != dn.rhs_spec[0])  # All but out-feature.
  apply = functools.partial(conv, window_strides=window_strides, padding=padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers,
                            feature_group_count=feature_group_count, precision=precision)
  if preferred_element_type is not None:
    apply = functools.partial(apply, preferred_element_type=preferred_element_type)
  if mode == 'fake':
    return apply(fake_quantize(lhs, lhs_axes), fake_quantize(rhs, rhs_axes))
  q_lhs, s_lhs = quantize(lhs, lhs_axes)
  q_rhs, s_rhs = quantize(rhs, rhs_axes)
  y = apply(q_lhs.astype(lhs.dtype), q_rhs.astype(lhs.dtype)).astype(jnp.float32)
  shape_b = [1] * y.ndim
  shape_b[dn.out_spec[0]] = lhs.shape[dn.lhs_spec[0]]
  shape_f = [1] * y.ndim
  shape_f[dn.out_spec[1]] = rhs.shape[dn.rhs_spec[0]]
  return (y * s_lhs.reshape(shape_b) * s_rhs.reshape(shape_f)).astype(lhs.dtype)


def _intercept(mode_: str):
  """A flax method interceptor: nn.Conv and nn.Dense calls go through the int8 functions."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, _UNSUPPORTED):
      path = '/'.join(module.scope.path) if module.scope is not None else type(module).__name__
      raise ConfigError(f'quantization does not support {type(module).__name__} layers ({path}); '
                        'int8 covers Dense, Conv and the Transformer\'s matmuls: turn '
                        'quant.qat and quant.int8 off for this model')
    own = getattr(module, 'conv_general_dilated', None) or getattr(module, 'dot_general', None)
    if (type(module) not in (nn.Conv, nn.Dense) or module.is_initializing() or
        getattr(own, 'func', None) in (conv_general_dilated, dot_general)):  # Done already.
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv):
      inner = module.conv_general_dilated or lax.conv_general_dilated
      if module.conv_general_dilated_cls is not None:
        inner = module.conv_general_dilated_cls()
      fn = functools.partial(conv_general_dilated, mode=mode_, conv=inner)
      quantized = module.clone(parent=None, conv_general_dilated=fn, conv_general_dilated_cls=None)
    else:
      inner = module.dot_general or lax.dot_general
      if module.dot_general_cls is not None:
        inner = module.dot_general_cls()
      fn = functools.partial(dot_general, mode=mode_, dot=inner)
      quantized = module.clone(parent=None, dot_general=fn, dot_general_cls=None)
    # The same weights (traced, so QAT's gradients reach them), read from the layer's scope.
    return quantized.apply({'params': module.variables['params']}, *args, **kwargs)
  return intercept


@dataclasses.dataclass(frozen=True)
class Intercepted:
  """An image model whose Conv and Dense layers run in `mode`; `init` and `apply` as flax's."""
  model: nn.Module
  mode: str

  def init(self, *args, **kwargs):
    with nn.intercept_methods(_intercept(self.mode)):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(_intercept(self.mode)):
      return self.model.apply(*args, **kwargs)


def wrap_model(model, mode_: str):
  """`model` running its matmuls in `mode_` ('' leaves it as it is)."""
  if not mode_:
    return model
  if hasattr(getattr(model, 'config', None), 'quant'):  # The Transformer and its Classifier.
    return model.clone(config=dataclasses.replace(model.config, quant=mode_))
  return Intercepted(model, mode_)


def saved_export(workdir: str) -> str:
  """quant.export in a workdir's config.json ('' if none, or no such file)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return ''
  with open(path) as f:
    saved = json.load(f)
  return saved.get('quant', {}).get('export', '')  # Any version's file: older ones lack it.


def check(config, workdir: str, read_only: bool) -> str:
  """The mode config.quant asks for, refusing what only an evaluation can do."""
  m = mode(config.quant)
  if config.quant.export not in ('', 'int8', 'float32'):
    raise ConfigError(f"quant.export={config.quant.export!r} must be '', 'int8' or 'float32' "
                      '(lm.quantize sets it)')
  export = config.quant.export or (saved_export(workdir) if not read_only else '')
  if not read_only and export:
    raise ConfigError(f'{workdir} holds an {export} export of weights, for --mode=eval and '
                      'lm.sample; train elsewhere (to fine-tune, start from the float run with '
                      '--config.init.workdir)')
  for item in filter(None, (x.strip() for x in config.init.workdir.split(','))):
    source = item.partition('=')[2] or item
    if saved_export(source):
      raise ConfigError(f'init.workdir {source!r} is an export of quantized weights; start '
                        'from the float run it came from')
  if not read_only and m == 'int8':
    raise ConfigError('quant.int8 is for evaluation: train with --config.quant.qat=True (or in '
                      'float), then write an int8 checkpoint with python -m lm.quantize')
  return m


# --- checkpoints --------------------------------------------------------------------------------


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def scale_axes(path: str, ndim: int) -> tuple[int, ...] | None:
  """The axes one scale covers for a stored weight; None for what stays float32 (1-D)."""
  from lm import prune  # pylint: disable=g-import-not-at-top  (input_axes lives with N:M)
  if ndim < 2 or path.split('/')[-1].endswith('bias'):  # The fused qkv's bias is [H, 3, Q].
    return None
  if path.split('/')[-1] in _EMBEDDINGS:
    return tuple(range(1, ndim))  # Per row: a token's vector, and a tied head's channel.
  return prune.input_axes(path, ndim)


def quantize_params(params):
  """(params with 2+-axis leaves as int8, nested dict of their scales)."""
  values, scales = {}, {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path(p)
    axes = scale_axes(name, x.ndim)
    if axes is None:
      _put(values, name, np.asarray(x, np.float32))
      continue
    q, s = jax.device_get(quantize(jnp.asarray(x), axes))
    _put(values, name, q)
    _put(scales, name, s)
  return values, scales


def dequantize(values, scales):
  """float32 params from quantize_params' output (numpy or jax arrays)."""
  out = {}
  flat_scales = {_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}
  for p, x in jax.tree_util.tree_flatten_with_path(values)[0]:
    name = _path(p)
    s = flat_scales.get(name)
    _put(out, name, x if s is None else x.astype(jnp.float32) * s)
  return out


def _put(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def _abstract_export(abstract_state, export: str):
  """The tree an export holds, as ShapeDtypeStructs in the train state's shardings."""
  params, scales = {}, {}
  for (p, x) in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]:
    name = _path(p)
    axes = scale_axes(name, x.ndim) if export == 'int8' else None
    dtype = jnp.float32 if axes is None else jnp.int8
    _put(params, name, jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding))
    if axes is not None:
      shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
      rep = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
      _put(scales, name, jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rep))
  tree = {'params': params, 'model_state': abstract_state.model_state}
  if scales:
    tree['scales'] = scales
  return tree


def restore_latest(workdir: str, abstract_state, export: str, then: str = 'run again to use'):
  """(step, train state with float params and no optimizer state) of an export in `workdir`."""
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  step, tree = checkpoint.restore_latest(workdir, _abstract_export(abstract_state, export), then)
  params = tree['params']
  if 'scales' in tree:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state.params)
    params = jax.jit(dequantize, out_shardings=shardings)(params, tree['scales'])
  params = jax.tree_util.tree_unflatten(jax.tree.structure(abstract_state.params),
                                        jax.tree.leaves(params))
  return step, abstract_state.replace(step=jnp.asarray(step, jnp.int32), params=params,
                                      opt_state=None, model_state=tree['model_state'],
                                      ema_params=None)


def restore_for_inference(workdir: str):
  """(config, float params on the default device) of a training run or an export; read-only."""
  from lm import checkpoint  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.from_saved(checkpoint.load_config(workdir).to_dict())
  if not config.quant.export:
    return config, checkpoint.restore_for_inference(workdir)[1]
  _, tree = checkpoint.restore_latest(workdir)
  params = dequantize(tree['params'], tree.get('scales', {}))
  return config, jax.tree.map(np.asarray, params)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# Files of a run a reader of the export needs: tokenizer, class labels, decision threshold.
_COPIED = ('tokenizer.json', 'labels.json', 'threshold.json')


def export(workdir: str, output: str, dtype: str = 'int8') -> dict:
  """Writes `workdir`'s latest weights to `output` as an int8 (or float32) export; a report."""
  from lm import checkpoint, train  # pylint: disable=g-import-not-at-top
  from lm import config as config_lib  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if dtype not in ('int8', 'float32'):
    raise ConfigError(f'--dtype={dtype!r} must be int8 or float32')
  if not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir!r} does not exist; point it at a trained run')
  if os.path.exists(output) and os.listdir(output):
    raise ConfigError(f'--output {output!r} exists and is not empty; pick a new directory')
  config = config_lib.from_saved(checkpoint.load_config(workdir).to_dict())
  if config.quant.export:
    raise ConfigError(f'{workdir} is already a {config.quant.export} export; quantize the '
                      'training run it came from')
  with config.unlocked():
    # The export stands alone: its weights are final, whatever run or teacher they came from.
    config.init.workdir, config.distill.teacher_workdir = '', ''
    config.quant.update(qat=False, int8=dtype == 'int8', export=dtype)
  # Building the int8 model here refuses a layer type it cannot quantize before anything is
  # written.
  trainer = train.Trainer(config, workdir, read_only=True)
  step, state = checkpoint.restore_latest(workdir, trainer.abstract_state, 'run again to use')
  weights = state.ema_params if state.ema_params is not None else state.params
  weights = jax.device_get(weights)
  values, scales = (quantize_params(weights) if dtype == 'int8' else
                    (jax.tree.map(lambda x: np.asarray(x, np.float32), weights), {}))
  tree = {'params': values, 'model_state': jax.device_get(state.model_state)}
  if scales:
    tree['scales'] = scales
  os.makedirs(output, exist_ok=True)
  mngr = checkpoint.manager(output, keep=1)
  mngr.save(step, args=ocp.args.StandardSave(tree))
  mngr.wait_until_finished()
  mngr.close()
  for name in _COPIED:
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(output, name))
  from lm import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir_lib.write_atomic(os.path.join(output, 'config.json'), config_lib.to_json(config))
  report = {'source': f'{os.path.abspath(workdir)}@{step}', 'dtype': dtype,
            'bytes_on_disk': _dir_bytes(os.path.join(output, 'checkpoints')),
            'float32_weight_bytes': int(sum(np.asarray(x).size * 4
                                            for x in jax.tree.leaves(weights))),
            'layers': _errors(weights, values, scales) if scales else []}
  workdir_lib.write_json(os.path.join(output, 'quantize.json'), report)
  return report


def _errors(weights, values, scales) -> list[dict]:
  """Per quantized weight: the largest rounding error in units of its channel's scale (<= 0.5)
  and the relative L2 error."""
  deq = dequantize(values, scales)
  flat_deq = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(deq)[0]}
  flat_s = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(scales)[0]}
  rows = []
  for p, w in jax.tree_util.tree_flatten_with_path(weights)[0]:
    name = _path(p)
    if name not in flat_s:
      continue
    w = np.asarray(w, np.float32)
    err = np.abs(w - np.asarray(flat_deq[name]))
    rows.append({'param': name, 'shape': list(w.shape),
                 'max_error_in_scales': float((err / np.asarray(flat_s[name])).max()),
                 'relative_l2_error': float(np.linalg.norm(err) / max(np.linalg.norm(w), 1e-30))})
  return rows


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  f = flags.FLAGS
  try:
    if not cli.WORKDIR.value or not f.output:
      raise ConfigError('--workdir (a training run) and --output (a new directory) are required')
    report = export(cli.WORKDIR.value, f.output, f.dtype)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  worst = max((r['max_error_in_scales'] for r in report['layers']), default=0.0)
  print(f'wrote the {report["dtype"]} weights of {report["source"]} to {f.output}: '
        f'{report["bytes_on_disk"]:,} bytes on disk ({report["float32_weight_bytes"]:,} bytes of '
        f'float32 weights); {len(report["layers"])} weights in int8, largest rounding error '
        f'{worst:.3f} of a step; per layer in quantize.json')
  print(json.dumps({k: v for k, v in report.items() if k != 'layers'}, sort_keys=True))



if __name__ == '__main__':
  # Defined here, not on import: lm.model imports this module. --workdir is lm/cli.py's, the
  # one definition every tool shares (absl refuses a flag defined twice in one process).
  flags.DEFINE_string('output', None, 'New directory for the export.')
  flags.DEFINE_enum('dtype', 'int8', ['int8', 'float32'],
                    'int8 weights and scales, or float32 weights (a same-format baseline).')
  app.run(main, flags_parser=cli.parse_flags)
