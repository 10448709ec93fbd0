import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as base
from lm import optim
from lm.config import ConfigError


def test_cosine_warms_up_then_decays_to_the_floor():
  c = base.get_config().optim
  c.update(lr=1e-3, warmup_steps=100, min_lr=1e-4, schedule='cosine')
  lr = optim.schedule(c, 2000)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(50)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(2000)), 1e-4, rtol=1e-5)
  assert float(lr(1000)) < 1e-3


def test_step_schedule_drops_at_boundaries():
  c = base.get_config().optim
  c.update(lr=0.1, warmup_steps=0, schedule='step', step_boundaries=(0.5, 0.75), step_factor=0.1)
  lr = optim.schedule(c, 100)
  np.testing.assert_allclose([float(lr(10)), float(lr(60)), float(lr(90))], [0.1, 0.01, 0.001],
                             rtol=1e-5)


def test_weight_decay_skips_biases_norms_and_embeddings():
  params = {'embed': {'embedding': 1}, 'block': {'ln': {'scale': 1}, 'dense': {'kernel': 1,
                                                                              'bias': 1}}}
  mask = optim.decay_mask(params)
  assert mask == {'embed': {'embedding': False},
                  'block': {'ln': {'scale': False}, 'dense': {'kernel': True, 'bias': False}}}


@pytest.mark.parametrize('name', ['adamw', 'adam', 'sgd', 'lion', 'adafactor'])
def test_every_optimizer_takes_a_step(name):
  c = base.get_config().optim
  c.update(name=name, warmup_steps=0, schedule='constant', lr=0.1)
  tx, _ = optim.make(c, 10)
  params = {'dense': {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones((4,))}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert float(jnp.abs(updates['dense']['kernel']).sum()) > 0


def test_unknown_optimizer_is_a_clear_error():
  c = base.get_config().optim
  c.name = 'adamww'
  with pytest.raises(ConfigError, match='adamw, adam, sgd'):
    optim.make(c, 10)
