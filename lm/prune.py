"""Magnitude pruning as an optax transform: the masks are optimizer state.

`wrap(tx, spec(config.prune, steps), config.train)` puts masks around the optimizer. Its state
holds one boolean mask per pruned parameter (True = kept) beside the optimizer's own, the
parameter's path at the end of the mask's, so the trainer shards masks like their parameters,
checkpoints them and resumes them with everything else; nothing else in it knows of pruning.

Each step the gradient is masked before the optimizer sees it, and the update after: a pruned
weight's update is minus the weight, so a weight pruned at this step becomes exactly 0 and a
zero stays 0 through any optimizer (weight decay and momentum included).

Masks come from weight magnitudes, recomputed on schedule:
  one-shot   (prune.end_step = 0) once, at prune.start_step, to prune.sparsity;
  gradual    at start_step and every prune.every steps to end_step, along Zhu & Gupta's (2017)
             cubic s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3); a pruned weight is 0, so it
             ranks lowest and stays pruned as s_t grows.
  unstructured, scope 'layer': the smallest floor(s * n) of each layer's n weights;
             scope 'global': the smallest floor(s * N) of all N pruned weights together.
  N:M        (e.g. 2:4) in every group of M consecutive inputs of each output, the N largest
             stay (sparsity 1 - N/M): the layout sparse tensor cores run. Groups run along the
             last contracting axis (`input_axes`), which M must divide.
By default the kernels of Dense, Einsum and Conv layers are pruned (every parameter with two
or more axes except embeddings and biases); `prune.params` and `prune.skip` are regexes over
paths.
"""

import dataclasses
import math
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import workdir as workdir_lib
from lm.config import ConfigError

_NOT_KERNELS = ('embedding', 'pos_embedding')


def is_kernel(path: str, ndim: int) -> bool:
  """A matmul's weight: 2+ axes, not an embedding, not a bias (the fused qkv's is [H, 3, Q])."""
  name = path.split('/')[-1]
  return ndim >= 2 and name not in _NOT_KERNELS and not name.endswith('bias')


def input_axes(path: str, ndim: int) -> tuple[int, ...]:
  """The axes of a weight its matmul contracts (leading, in this codebase's layouts).

  The attention's fused qkv kernel [D, H, 3, Q] contracts D; every other kernel contracts all
  but its last axis: Dense [I, O], Conv [kh, kw, I, O], the attention output [H, Q, D].
  """
  if path.split('/')[-1] == 'qkv':
    return (0,)
  return tuple(range(ndim - 1))


class PruneState(NamedTuple):
  count: jax.Array  # Updates so far: the train step.
  masks: Any  # Per parameter: bool (True = kept), or a scalar True where nothing is pruned.
  inner: optax.OptState


@dataclasses.dataclass(frozen=True)
class Spec:
  """config.prune, checked."""
  sparsity: float
  n: int  # N:M pattern (0, 0 for unstructured).
  m: int
  scope: str
  start: int
  end: int
  every: int
  params: re.Pattern | None
  skip: re.Pattern | None

  def selects(self, path: str, ndim: int) -> bool:
    if self.skip is not None and self.skip.search(path):
      return False
    if self.params is not None:
      return bool(self.params.search(path))
    return is_kernel(path, ndim)

  def sparsity_at(self, step):
    """Target sparsity after the masks computed at `step` (traced or not)."""
    if self.end == 0:
      return jnp.where(step >= self.start, self.sparsity, 0.0)
    frac = jnp.clip((step - self.start) / (self.end - self.start), 0.0, 1.0)
    return jnp.where(step >= self.start, self.sparsity * (1.0 - (1.0 - frac) ** 3), 0.0)

  def due(self, step):
    """Whether the masks are recomputed at `step`."""
    if self.end == 0:
      return step == self.start
    return (step >= self.start) & (step <= self.end) & (
        ((step - self.start) % self.every == 0) | (step == self.end))


def _regex(text: str, field: str) -> re.Pattern | None:
  if not text:
    return None
  try:
    return re.compile(text)
  except re.error as e:
    raise ConfigError(f'prune.{field}: {text!r} is not a valid regex ({e}); fix '
                      f'--config.prune.{field}') from None


def spec(prune_cfg, steps: int) -> Spec | None:
  """config.prune checked against the run's length; None when pruning is off."""
  p = prune_cfg
  if not (math.isfinite(p.sparsity) and 0 <= p.sparsity < 1):
    raise ConfigError(f'prune.sparsity={p.sparsity} must be in [0, 1) (0 = no pruning)')
  n = m = 0
  if p.pattern != 'unstructured':
    match = re.fullmatch(r'(\d+):(\d+)', p.pattern)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
      raise ConfigError(f"prune.pattern={p.pattern!r} must be 'unstructured' or 'N:M' with "
                        "0 < N < M, e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if p.sparsity not in (0, 1 - n / m):
      raise ConfigError(f'prune.pattern={p.pattern} prunes {1 - n / m:g} of the weights but '
                        f'prune.sparsity={p.sparsity}; leave prune.sparsity at 0 with N:M')
    if p.scope != 'layer':
      raise ConfigError(f'prune.scope={p.scope!r}: N:M groups are per layer; set '
                        'prune.scope=layer')
    if p.end_step:
      raise ConfigError(f'prune.end_step={p.end_step}: N:M masks are set once, at '
                        'prune.start_step; set prune.end_step=0')
  elif p.sparsity == 0:
    return None
  if p.scope not in ('layer', 'global'):
    raise ConfigError(f"prune.scope={p.scope!r} must be 'layer' or 'global'")
  if p.every < 1:
    raise ConfigError(f'prune.every={p.every} must be >= 1')
  if not 0 <= p.start_step < steps:
    raise ConfigError(f'prune.start_step={p.start_step} must be in [0, train steps={steps})')
  if p.end_step and not p.start_step < p.end_step <= steps:
    raise ConfigError(f'prune.end_step={p.end_step} must be 0 (one-shot) or in '
                      f'(prune.start_step={p.start_step}, train steps={steps}]')
  return Spec(sparsity=1 - n / m if m else p.sparsity, n=n, m=m, scope=p.scope,
              start=p.start_step, end=p.end_step, every=p.every,
              params=_regex(p.params, 'params'), skip=_regex(p.skip, 'skip'))


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def selection(s: Spec, params):
  """A tree of bools: which parameters are pruned. Refuses an empty or unfit selection."""
  chosen = jax.tree_util.tree_map_with_path(lambda p, x: s.selects(_path(p), x.ndim), params)
  names = [_path(p) for p, c in jax.tree_util.tree_flatten_with_path(chosen)[0] if c]
  if not names:
    paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ConfigError(f'prune selects no parameter (they are like {", ".join(paths[:3])}, ...); '
                      'fix --config.prune.params or --config.prune.skip')
  if s.m:
    for (p, x), c in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                         jax.tree.leaves(chosen)):
      name = _path(p)
      if not c:
        continue
      axes = input_axes(name, x.ndim)
      if x.ndim < 2 or x.shape[axes[-1]] % s.m:
        size = x.shape[axes[-1]] if x.ndim >= 2 else x.size
        raise ConfigError(
            f'prune.pattern={s.n}:{s.m} needs groups of {s.m} inputs, but {name} '
            f'{tuple(x.shape)} has {size} along its input axis; leave it out with '
            f"--config.prune.skip='^{re.escape(name)}$'")
  return chosen


def _ranks(a):
  """Each element's position in the ascending order of `a` (ties by index): exact counts."""
  return jnp.argsort(jnp.argsort(a, stable=True), stable=True)


def _nm_mask(w, n: int, m: int, path: str):
  axes = input_axes(path, w.ndim)
  last = axes[-1]
  a = math.prod(w.shape[:last])
  grouped = jnp.abs(w).reshape(a, w.shape[last] // m, m, -1)
  # Descending rank within each group of m: the n largest are kept.
  rank = jnp.argsort(jnp.argsort(-grouped, axis=2, stable=True), axis=2, stable=True)
  return (rank < n).reshape(w.shape)


def _count(s: Spec, sparsity, size: int):
  """floor(sparsity * size) weights to prune; at the target, exactly Python's floor (float32
  would make floor(0.7 * 10) = 6)."""
  return jnp.where(sparsity >= jnp.float32(s.sparsity), math.floor(s.sparsity * size),
                   jnp.floor(sparsity * size).astype(jnp.int32))


def compute_masks(s: Spec, params, chosen, masks, sparsity):
  """New masks at `sparsity` (traced) from |params|; what is pruned already ranks lowest."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_path(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  picked = jax.tree.leaves(chosen)
  old = jax.tree.leaves(masks)
  out = list(old)
  mags = {i: jnp.abs(x) * old[i] for i, x in enumerate(leaves) if picked[i]}
  if s.m:
    for i in mags:
      out[i] = _nm_mask(leaves[i], s.n, s.m, names[i]) & old[i]
  elif s.scope == 'layer':
    for i, mag in mags.items():
      out[i] = (_ranks(mag.ravel()) >= _count(s, sparsity, mag.size)).reshape(mag.shape)
  else:
    order = list(mags)
    every = jnp.concatenate([mags[i].ravel() for i in order])
    kept = _ranks(every) >= _count(s, sparsity, every.size)
    start = 0
    for i in order:
      out[i] = kept[start:start + mags[i].size].reshape(mags[i].shape)
      start += mags[i].size
  return jax.tree_util.tree_unflatten(treedef, out)


def wrap(tx: optax.GradientTransformation, s: Spec | None,
         train_cfg) -> optax.GradientTransformation:
  """`tx` with the masks of `s` (from `spec`) around it; `tx` itself when pruning is off."""
  if s is None:
    return tx
  if train_cfg.ema_decay:
    raise ConfigError('prune with train.ema_decay > 0: the EMA of pruned weights is not '
                      'sparse, and it is what gets evaluated; set train.ema_decay=0')

  def init(params):
    chosen = selection(s, params)
    masks = jax.tree.map(lambda x, c: jnp.ones(x.shape if c else (), bool), params, chosen)
    return PruneState(count=jnp.zeros((), jnp.int32), masks=masks, inner=tx.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('pruning needs the params in update()')
    chosen = selection(s, params)
    masks = jax.lax.cond(
        s.due(state.count),
        lambda: compute_masks(s, params, chosen, state.masks, s.sparsity_at(state.count)),
        lambda: state.masks)
    grads = jax.tree.map(lambda g, k: jnp.where(k, g, 0), grads, masks)
    updates, inner = tx.update(grads, state.inner, params)
    # Kept weights get the optimizer's update untouched; pruned ones land on exactly 0.
    updates = jax.tree.map(lambda u, k, p: jnp.where(k, u, -p), updates, masks, params)
    return updates, PruneState(count=state.count + 1, masks=masks, inner=inner)

  return optax.GradientTransformation(init, update)


def report(params, s: Spec) -> dict:
  """Zeros per pruned parameter, counted in the params themselves; totals over those and all."""
  layers, total, nonzero = [], 0, 0
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(x)
    name, kept = _path(p), int(np.count_nonzero(x))
    total, nonzero = total + x.size, nonzero + kept
    if s.selects(name, x.ndim):
      layers.append({'param': name, 'shape': list(x.shape), 'size': int(x.size),
                     'zeros': int(x.size) - kept, 'sparsity': 1 - kept / max(x.size, 1)})
  size = sum(l['size'] for l in layers)
  zeros = sum(l['zeros'] for l in layers)
  return {'layers': layers, 'pruned_params': size, 'pruned_zeros': zeros,
          'pruned_sparsity': zeros / max(size, 1), 'params': total, 'nonzero_params': nonzero,
          'sparsity': 1 - nonzero / max(total, 1)}


def write_report(workdir: str, params, s: Spec) -> str:
  """sparsity.json and sparsity.md in the workdir; returns the markdown table."""
  r = report(params, s)
  lines = ['| parameter | shape | zeros | sparsity |', '| --- | --- | --- | --- |']
  lines += [f'| {l["param"]} | {"x".join(map(str, l["shape"]))} | {l["zeros"]:,} of '
            f'{l["size"]:,} | {l["sparsity"]:.4f} |' for l in r['layers']]
  lines += [f'| pruned parameters | | {r["pruned_zeros"]:,} of {r["pruned_params"]:,} | '
            f'{r["pruned_sparsity"]:.4f} |',
            f'| all parameters | | {r["params"] - r["nonzero_params"]:,} of {r["params"]:,} | '
            f'{r["sparsity"]:.4f} |']
  table = '\n'.join(lines)
  workdir_lib.write_json(os.path.join(workdir, 'sparsity.json'), r)
  workdir_lib.write_atomic(os.path.join(workdir, 'sparsity.md'), table + '\n')
  return table
