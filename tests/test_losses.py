"""lm/losses.py against the formulas, computed in numpy (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import losses


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.4])
def test_cross_entropy_with_label_smoothing_is_its_formula(smoothing):
  """-sum_k t_k log p_k with t = (1 - s) one_hot(label) + s / K: the label keeps 1 - s + s/K
  and every class gets s / K, weighted per example; the weight is the sum of the weights."""
  k = 7
  logits = jax.random.normal(jax.random.key(0), (2, 5, k)) * 3  # [..., K] with ... = [2, 5].
  labels = jax.random.randint(jax.random.key(1), (2, 5), 0, k)
  weights = jax.random.uniform(jax.random.key(2), (2, 5))
  log_p = _log_softmax(logits)
  targets = (1 - smoothing) * np.eye(k)[np.asarray(labels)] + smoothing / k
  per_example = -(targets * log_p).sum(-1)

  total, weight = losses.cross_entropy(logits, labels, label_smoothing=smoothing)
  np.testing.assert_allclose(total, per_example.sum(), rtol=1e-5)
  assert float(weight) == labels.size
  total, weight = losses.cross_entropy(logits, labels, weights, label_smoothing=smoothing)
  np.testing.assert_allclose(total, (per_example * np.asarray(weights)).sum(), rtol=1e-5)
  np.testing.assert_allclose(weight, np.asarray(weights).sum(), rtol=1e-6)
  if smoothing:  # Smoothing changes the loss: else the formula above was never exercised.
    plain = -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1).sum()
    assert abs(float(losses.cross_entropy(logits, labels, label_smoothing=smoothing)[0]) -
               plain) > 0.1


def test_focal_loss_is_its_formula_and_gamma_zero_is_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (16, 4)) * 2
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 4)
  log_p = np.take_along_axis(_log_softmax(logits), np.asarray(labels)[:, None], -1)[:, 0]
  total, weight = losses.focal(logits, labels, gamma=2.0)
  np.testing.assert_allclose(total, (-(1 - np.exp(log_p)) ** 2 * log_p).sum(), rtol=1e-5)
  assert float(weight) == 16
  np.testing.assert_allclose(losses.focal(logits, labels, gamma=0.0)[0],
                             losses.cross_entropy(logits, labels)[0], rtol=1e-6)


def test_mean_divides_the_sum_by_the_weight():
  assert float(losses.mean((jnp.float32(6.0), jnp.float32(4.0)))) == 1.5
  assert float(losses.mean((jnp.float32(0.0), jnp.float32(0.0)))) == 0.0  # No valid example.
