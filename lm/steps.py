"""Pure train and eval steps, shared by every task.

Both tasks are classification by softmax cross-entropy: a language model classifies each
position's next token ([B, L] targets), an image model each image ([B] targets). Models are
called as `model.apply(variables, inputs, train=...)` and return float32 logits.

Keys: B batch, L length, V vocabulary or classes, A accumulation micro-batches.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm import classification


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Non-trainable collections, e.g. {'batch_stats': ...}; {} for the LM.
  ema_params: Any  # An EMA of params when train.ema_decay > 0, else None.


def cross_entropy(logits, targets, label_smoothing: float = 0.0):
  """Per-target loss; logits [..., V], targets [...]."""
  if label_smoothing:
    num_classes = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _forward(model: nn.Module, params, model_state, inputs, train: bool, rng):
  variables = {'params': params, **model_state}
  if train and model_state:
    logits, new_state = model.apply(variables, inputs, train=True, rngs={'dropout': rng},
                                    mutable=list(model_state))
    return logits, dict(new_state)
  return model.apply(variables, inputs, train=train, rngs={'dropout': rng}), model_state


def _loss_and_grads(model, params, model_state, batch, rng, label_smoothing):
  def loss_fn(p):
    logits, new_state = _forward(model, p, model_state, batch['inputs'], True, rng)
    loss = cross_entropy(logits, batch['targets'], label_smoothing).mean()
    accuracy = (logits.argmax(-1) == batch['targets']).mean()
    return loss, (new_state, accuracy)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch, *, model: nn.Module, tx: optax.GradientTransformation,
               seed: int, grad_accum_steps: int = 1, label_smoothing: float = 0.0,
               ema_decay: float = 0.0):
  """One optimizer step. Returns (new state, metrics); a non-finite step leaves state unchanged."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  if grad_accum_steps == 1:
    (loss, (model_state, accuracy)), grads = _loss_and_grads(
        model, state.params, state.model_state, batch, rng, label_smoothing)
  else:
    # Row j*A + i goes to micro-batch i, so every device keeps its own rows (no resharding).
    micro = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 1, 0), batch)

    def accumulate(carry, xs):
      grads, loss, accuracy, model_state = carry
      i, mb = xs
      (l, (model_state, a)), g = _loss_and_grads(
          model, state.params, model_state, mb, jax.random.fold_in(rng, i), label_smoothing)
      return (jax.tree.map(jnp.add, grads, g), loss + l, accuracy + a, model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, accuracy, model_state), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros(()), jnp.zeros(()), state.model_state),
        (jnp.arange(grad_accum_steps), micro))
    grads, loss, accuracy = jax.tree.map(lambda x: x / grad_accum_steps, (grads, loss, accuracy))

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=model_state, ema_params=ema)
  # Guard in the graph, so no NaN ever reaches params or a checkpoint; the host learns of it
  # from the metrics it already fetches and decides whether to stop or roll back.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=new.step))
  metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': grad_norm, 'finite': finite}
  return new, metrics


def eval_step(params, model_state, batch, *, model: nn.Module, num_classes: int = 0):
  """Sums over the batch (weighted by batch['mask'] when present), to add up across batches."""
  logits, _ = _forward(model, params, model_state, batch['inputs'], False, jax.random.key(0))
  targets = batch['targets']
  mask = batch.get('mask', jnp.ones(targets.shape[:1], jnp.float32))
  mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (targets.ndim - 1)), targets.shape)
  preds = logits.argmax(-1)
  sums = {
      'loss': (cross_entropy(logits, targets) * mask).sum(),
      'correct': ((preds == targets) * mask).sum(),
      'count': mask.sum(),
  }
  if num_classes:
    sums['confusion'] = classification.confusion_matrix(preds, targets, mask, num_classes)
  return sums
