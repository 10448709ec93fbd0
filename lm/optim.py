"""Optimizer and learning-rate schedule from `config.optim`."""

import jax
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


def make(optim_cfg, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full transformation (clip, optimizer, decay, lr) and its schedule, for logging."""
  lr = schedule(optim_cfg, steps)
  wd = optim_cfg.weight_decay
  name = optim_cfg.name
  if name == 'adamw':
    tx = optax.adamw(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=wd,
                     mask=decay_mask)
  elif name == 'adam':
    tx = optax.adam(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps)
  elif name == 'sgd':
    # Coupled L2 decay, as in the CIFAR ResNet papers: the gradient gets wd * param.
    tx = optax.chain(optax.masked(optax.add_decayed_weights(wd), decay_mask),
                     optax.sgd(lr, optim_cfg.momentum or None, nesterov=optim_cfg.nesterov))
  elif name == 'lion':
    tx = optax.lion(lr, optim_cfg.b1, optim_cfg.b2, weight_decay=wd, mask=decay_mask)
  elif name == 'adafactor':
    tx = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
  else:
    raise ConfigError(f'optim.name={name!r} is unknown; use adamw, adam, sgd, lion or adafactor')
  if optim_cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  return tx, lr
