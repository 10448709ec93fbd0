"""Pure train and eval steps, shared by every task.

The task owns the loss: `loss_fn(params, model_state, batch, rng) -> (loss, aux)` with
aux = {'model_state': updated non-trainable collections, 'metrics': {name: scalar}}. The step
owns everything around it: gradient accumulation, the optimizer, the EMA and the guard that
keeps a non-finite step out of the state. Whatever is held fixed while training (a teacher)
arrives as the explicit `frozen` argument, never through the state or a closure.

Keys: A accumulation micro-batches.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Non-trainable collections, e.g. {'batch_stats': ...}; {} for the LM.
  ema_params: Any  # An EMA of params when train.ema_decay > 0, else None.


# Elements one reduction of all_finite covers at most (per device): 64 MiB of float32.
_CHECK_BUCKET = 1 << 24


def all_finite(tree, shardings=None) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite.

  A few large reductions, not one per leaf: each device concatenates its own shards (under
  shard_map with the leaves' `shardings`, so nothing is gathered) into buckets of at most
  _CHECK_BUCKET elements, reduces each, and the devices agree with a pmin. One reduction per
  leaf (params, both Adam moments) compiled the Shakespeare step to 1286 kernels instead of
  682, and its compile peaked 70-117 MiB higher on CPU (docs/BENCHMARKS.md).
  Without `shardings` the leaves are concatenated whole: right on one device or for a
  replicated tree; a sharded one would be gathered.
  """
  leaves = jax.tree.leaves(tree)
  placed = None if shardings is None else jax.tree.leaves(shardings)
  specs = None if placed is None else [s.spec for s in placed]
  if specs is not None and len(specs) != len(leaves):
    raise ValueError(f'all_finite: {len(leaves)} leaves but {len(specs)} shardings')
  floats = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]
  leaves = [leaves[i] for i in floats]

  def local(*xs):
    ok, bucket, size = jnp.array(True), [], 0
    for x in (*xs, None):
      if bucket and (x is None or size + x.size > _CHECK_BUCKET):
        # NaN and inf times 0 are NaN, finite values 0: one fused reduction, where
        # isfinite(...).all() compiled to three kernels on XLA:CPU.
        ok &= jnp.isfinite(jnp.sum(jnp.concatenate(bucket) * 0))
        bucket, size = [], 0
      if x is not None:
        bucket.append(x.ravel().astype(jnp.float32))  # Exact for bf16; keeps inf and NaN.
        size += x.size
    return ok

  if not leaves:
    return jnp.array(True)
  if specs is None:
    return local(*leaves)
  mesh = placed[0].mesh

  def agreed(*xs):
    return jax.lax.pmin(local(*xs).astype(jnp.int32), mesh.axis_names)

  return jax.shard_map(agreed, mesh=mesh, in_specs=tuple(specs[i] for i in floats),
                       out_specs=P())(*leaves) == 1


def _grads(loss_fn, params, model_state, batch, rng, frozen):
  extra = {} if frozen is None else {'frozen': frozen}
  (loss, aux), grads = jax.value_and_grad(
      lambda p: loss_fn(p, model_state, batch, rng, **extra), has_aux=True)(params)
  return loss, aux['model_state'], aux['metrics'], grads


def train_step(state: TrainState, batch, frozen=None, *, loss_fn: Callable,
               tx: optax.GradientTransformation, seed: int, grad_accum_steps: int = 1,
               ema_decay: float = 0.0, shardings: TrainState | None = None):
  """One optimizer step. Returns (new state, metrics); a non-finite step leaves state unchanged.

  `shardings` (the state's, as jit places it) lets the finiteness check run on each device's
  own shards (see all_finite).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  if grad_accum_steps == 1:
    loss, model_state, metrics, grads = _grads(loss_fn, state.params, state.model_state, batch,
                                               rng, frozen)
  else:
    # Row j*A + i goes to micro-batch i, so every device keeps its own rows (no resharding).
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 1, 0), batch)

    def accumulate(carry, xs):
      sums, model_state = carry
      i, mb = xs
      loss, model_state, metrics, grads = _grads(
          loss_fn, state.params, model_state, mb, jax.random.fold_in(rng, i), frozen)
      return (jax.tree.map(jnp.add, sums, (loss, metrics, grads)), model_state), None

    shapes = jax.eval_shape(lambda: _grads(loss_fn, state.params, state.model_state,
                                           jax.tree.map(lambda x: x[0], micro), rng, frozen))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (shapes[0], shapes[2], shapes[3]))
    (sums, model_state), _ = jax.lax.scan(accumulate, (zeros, state.model_state),
                                          (jnp.arange(grad_accum_steps), micro))
    # The mean over micro-batches: equal to the whole batch's mean loss and gradient when
    # every micro-batch carries the same weight.
    loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, sums)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=model_state, ema_params=ema)
  # Guard in the graph, so no NaN ever reaches the state or a checkpoint: the loss and the
  # gradient, and the new state itself (a NaN learning rate makes NaN params from finite
  # gradients). The host learns of it from the metrics it already fetches.
  rest = lambda t: (t.params, t.opt_state, t.model_state, t.ema_params)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
            all_finite(rest(new), None if shardings is None else rest(shardings)))
  # One branch per step instead of a select per leaf: the copies the conditional makes are
  # memcpys, where 150-odd selects were compiled kernels (docs/BENCHMARKS.md, memory).
  old = state.replace(step=new.step)
  new = jax.lax.cond(finite, lambda: new, lambda: old)
  return new, {**metrics, 'loss': loss, 'grad_norm': grad_norm, 'finite': finite}


def eval_step(params, model_state, batch, *, sums_fn: Callable):
  """The task's additive sums over one batch, to add up across batches on the host."""
  return sums_fn(params, model_state, batch)
