"""Losses as small pure functions.

The per-example losses return (sum, weight): token padding, valid-example masks and class
weights all arrive as one `weights` array, and the mean is `sum / weight` (Flax lm1b's
weighted cross-entropy). Penalties on parameters return a scalar to add to a mean loss.

Shape key: `...` any leading axes ([B] for a classifier, [B, L] for a language model),
K classes (or vocabulary).
"""

import jax
import jax.numpy as jnp
import optax


def _weigh(loss, weights):
  if weights is None:
    return loss.sum(), jnp.asarray(loss.size, jnp.float32)
  weights = weights.astype(jnp.float32)
  return (loss * weights).sum(), weights.sum()


def cross_entropy(logits_xK, labels, weights=None, label_smoothing: float = 0.0):
  """(sum, weight) of softmax cross-entropy; with smoothing, the target keeps 1 - smoothing
  and spreads the rest evenly over all K classes (optax.smooth_labels)."""
  if label_smoothing:
    targets_xK = optax.smooth_labels(jax.nn.one_hot(labels, logits_xK.shape[-1]),
                                     label_smoothing)
    loss = optax.softmax_cross_entropy(logits_xK, targets_xK)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_xK, labels)
  return _weigh(loss, weights)


def focal(logits_xK, labels, weights=None, gamma: float = 2.0):
  """(sum, weight) of the focal loss of Lin et al. 2017: -(1 - p)^gamma log p of the label.

  Down-weights examples the model already gets right, which helps on imbalanced data;
  gamma = 0 is cross-entropy.
  """
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits_xK.astype(jnp.float32)),
                              labels[..., None], axis=-1)[..., 0]
  loss = -((1.0 - jnp.exp(log_p)) ** gamma) * log_p
  return _weigh(loss, weights)


def mse(predictions, targets, weights=None):
  """(sum, weight) of squared error, summed over a trailing feature axis if there is one."""
  err = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
  if weights is not None and err.ndim > weights.ndim:
    err = err.reshape(*weights.shape, -1).sum(-1)
  return _weigh(err, weights)


def distillation(student_logits_xK, teacher_logits_xK, temperature: float, weights=None):
  """(sum, weight) of T^2 * KL(teacher_T || student_T) (Hinton et al. 2015).

  The T^2 keeps the gradient's scale comparable to cross-entropy's as T changes.
  """
  t = temperature
  teacher_xK = jax.nn.log_softmax(teacher_logits_xK.astype(jnp.float32) / t)
  student_xK = jax.nn.log_softmax(student_logits_xK.astype(jnp.float32) / t)
  kl = (jnp.exp(teacher_xK) * (teacher_xK - student_xK)).sum(-1)
  return _weigh(kl * t * t, weights)


def mean(sum_and_weight) -> jax.Array:
  total, weight = sum_and_weight
  return total / jnp.maximum(weight, 1e-12)


def l1_penalty(params, mask=None) -> jax.Array:
  """sum |w| over the leaves `mask` (a tree of bools, as optax masks) selects."""
  return _penalty(params, mask, jnp.abs)


def l2_penalty(params, mask=None) -> jax.Array:
  """0.5 * sum w^2 over the selected leaves: the gradient is w, as for coupled weight decay."""
  return 0.5 * _penalty(params, mask, jnp.square)


def _penalty(params, mask, fn) -> jax.Array:
  leaves = jax.tree.leaves(params)
  keep = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
  terms = [fn(x.astype(jnp.float32)).sum() for x, k in zip(leaves, keep) if k]
  return sum(terms, jnp.zeros((), jnp.float32))
