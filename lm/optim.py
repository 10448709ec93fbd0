"""Optimizer and learning-rate schedule from `config.optim`."""

import math
import re

import jax
import jax.numpy as jnp
import optax

from lm.config import ConfigError

# Weight decay skips parameters whose path ends in one of these names: biases, norm scales,
# embeddings (token and position) and BatchNorm parameters.
_NO_DECAY = ('bias', 'scale', 'embedding', 'pos_embedding')


def schedule(optim_cfg, steps: int) -> optax.Schedule:
  lr, warmup = optim_cfg.lr, min(optim_cfg.warmup_steps, steps)
  name = optim_cfg.schedule
  if name == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) \
        if warmup else optax.constant_schedule(lr)
  if name == 'cosine':
    decay = optim_cfg.decay_steps or steps
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(decay, warmup + 1), end_value=optim_cfg.min_lr)
  if name == 'step':
    boundaries = {int(f * steps): optim_cfg.step_factor for f in optim_cfg.step_boundaries}
    decayed = optax.piecewise_constant_schedule(lr, boundaries)
    if not warmup:
      return decayed
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), lambda s: decayed(s + warmup)], [warmup])
  if name == 'onecycle':
    return optax.cosine_onecycle_schedule(
        steps, lr, pct_start=max(warmup, 1) / steps, final_div_factor=lr / max(optim_cfg.min_lr, 1e-12))
  raise ConfigError(f'optim.schedule={name!r} is unknown; use cosine, constant, step or onecycle')


def decay_mask(params):
  def keep(path, _):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    return not any(name.endswith(n) for n in _NO_DECAY)
  return jax.tree_util.tree_map_with_path(keep, params)


def _optimizer(optim_cfg, lr) -> optax.GradientTransformation:
  wd = optim_cfg.weight_decay
  name = optim_cfg.name
  if name == 'adamw':
    return optax.adamw(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=wd,
                       mask=decay_mask)
  if name == 'adam':
    return optax.adam(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps)
  if name == 'sgd':
    # Coupled L2 decay, as in the CIFAR ResNet papers: the gradient gets wd * param.
    return optax.chain(optax.masked(optax.add_decayed_weights(wd), decay_mask),
                       optax.sgd(lr, optim_cfg.momentum or None, nesterov=optim_cfg.nesterov))
  if name == 'lion':
    return optax.lion(lr, optim_cfg.b1, optim_cfg.b2, weight_decay=wd, mask=decay_mask)
  if name == 'adafactor':
    return optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
  raise ConfigError(f'optim.name={name!r} is unknown; use adamw, adam, sgd, lion or adafactor')


def path_str(path) -> str:
  """A parameter's path as the regexes of optim.freeze / optim.lr_mults see it: 'a/b/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _regex(text: str, field: str) -> re.Pattern:
  try:
    return re.compile(text)
  except re.error as e:
    raise ConfigError(f'{field}: {text!r} is not a valid regex ({e}); fix --config.{field}') from None


def _lr_rules(optim_cfg) -> list[tuple[re.Pattern, float]]:
  """optim.lr_mults 'regex=mult,regex=mult' as (pattern, multiplier), first match wins."""
  rules = []
  for item in filter(None, (x.strip() for x in optim_cfg.lr_mults.split(','))):
    pattern, sep, mult = item.rpartition('=')
    try:
      value = float(mult)
    except ValueError:
      value = math.nan
    if not sep or not (math.isfinite(value) and value >= 0):
      raise ConfigError(f"optim.lr_mults item {item!r} is not 'regex=multiplier' with a "
                        'multiplier >= 0; e.g. --config.optim.lr_mults="block_[01]/=0.1,cls_head=10"')
    rules.append((_regex(pattern, 'optim.lr_mults'), value))
  return rules


def _layer(path: str, num_layers: int) -> int:
  """Layer index for layer-wise decay: embeddings 0, block_i i + 1, everything else (the
  final norm and the head) num_layers + 1."""
  m = re.search(r'(?:^|/)block_(\d+)/', path)
  if m:
    return int(m.group(1)) + 1
  if re.search(r'(?:^|/)blocks/', path):
    raise ConfigError('optim.layer_decay needs a learning rate per layer, which the stacked '
                      'parameters of model.scan_layers=True cannot have; set '
                      'model.scan_layers=False')
  if re.search(r'(?:^|/)(pos_)?embedding$', path):
    return 0
  return num_layers + 1


def param_labels(optim_cfg, num_layers: int = 0):
  """A function params -> tree of group labels: 'frozen', 'thaw' (frozen until
  optim.unfreeze_at), 'lr_<i>' (optim.lr_mults rule i), 'layer_<k>' (layer-wise decay) or
  'base'."""
  freeze = _regex(optim_cfg.freeze, 'optim.freeze') if optim_cfg.freeze else None
  rules = _lr_rules(optim_cfg)

  def label(path, _):
    p = path_str(path)
    if freeze is not None and freeze.search(p):
      return 'thaw' if optim_cfg.unfreeze_at else 'frozen'
    for i, (pattern, _) in enumerate(rules):
      if pattern.search(p):
        return f'lr_{i}'
    if optim_cfg.layer_decay:
      return f'layer_{_layer(p, num_layers)}'
    return 'base'
  return lambda params: jax.tree_util.tree_map_with_path(label, params)


def check_patterns(optim_cfg, params) -> None:
  """optim.freeze and each optim.lr_mults regex must match at least one parameter."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  patterns = [('optim.freeze', optim_cfg.freeze)] if optim_cfg.freeze else []
  patterns += [('optim.lr_mults', p.pattern) for p, _ in _lr_rules(optim_cfg)]
  for field, pattern in patterns:
    if not any(re.search(pattern, p) for p in paths):
      raise ConfigError(f'{field} regex {pattern!r} matches no parameter (they are like '
                        f'{", ".join(paths[:3])}, ...); fix --config.{field}')


def make(optim_cfg, steps: int, num_layers: int = 0
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full transformation (clip, optimizer, decay, lr) and its schedule, for logging.

  With optim.freeze, optim.lr_mults or optim.layer_decay, parameters fall into groups
  (optax.multi_transform): frozen ones get optax.set_to_zero and no optimizer state; the
  others each get the optimizer at their own multiple of the schedule.
  """
  lr = schedule(optim_cfg, steps)
  if not (0 <= optim_cfg.layer_decay < 1):
    raise ConfigError(f'optim.layer_decay={optim_cfg.layer_decay} must be in [0, 1) (0 = off)')
  grouped = optim_cfg.freeze or optim_cfg.lr_mults or optim_cfg.layer_decay
  if optim_cfg.unfreeze_at and not optim_cfg.freeze:
    raise ConfigError('optim.unfreeze_at needs optim.freeze (what to unfreeze)')
  if not grouped:
    tx = _optimizer(optim_cfg, lr)
  else:
    scaled = lambda mult: (lambda step: mult * lr(step))
    groups = {'base': _optimizer(optim_cfg, lr), 'frozen': optax.set_to_zero()}
    for i, (_, mult) in enumerate(_lr_rules(optim_cfg)):
      groups[f'lr_{i}'] = _optimizer(optim_cfg, scaled(mult))
    if optim_cfg.layer_decay:
      for k in range(num_layers + 2):
        groups[f'layer_{k}'] = _optimizer(
            optim_cfg, scaled(optim_cfg.layer_decay ** (num_layers + 1 - k)))
    if optim_cfg.unfreeze_at:
      n = optim_cfg.unfreeze_at
      groups['thaw'] = _optimizer(optim_cfg, lambda step: jnp.where(step < n, 0.0, lr(step)))
    tx = optax.multi_transform(groups, param_labels(optim_cfg, num_layers))
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx, lr
