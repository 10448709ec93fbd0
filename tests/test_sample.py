"""Tests for lm/sample.py and the model's KV-cache decoding."""

import dataclasses
import functools
import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import model as model_lib
from lm import sample
from lm.config import ConfigError

TINY = model_lib.TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=16,
                                   mlp_dim=32, seq_len=12)


@functools.cache
def _model_and_params(pos='learned'):
  model = model_lib.Transformer(dataclasses.replace(TINY, pos=pos))
  tokens = np.zeros((1, TINY.seq_len), np.int32)
  return model, jax.jit(model.init)(jax.random.key(0), tokens)['params']


@pytest.mark.parametrize('pos', ['learned', 'rope'])
def test_cached_decoding_matches_full_forward(pos):
  model, params = _model_and_params(pos)
  tokens = jax.random.randint(jax.random.key(1), (2, TINY.seq_len), 0, TINY.vocab_size)
  full = jax.jit(model.apply)({'params': params}, tokens)
  cache = model_lib.init_cache(model, batch_size=2, max_len=TINY.seq_len)
  decode = jax.jit(lambda c, x: model.apply({'params': params, 'cache': c}, x, decode=True,
                                            mutable=['cache']))
  # A 5-token prefill, then one token per call.
  pieces = [tokens[:, :5]] + [tokens[:, t:t + 1] for t in range(5, TINY.seq_len)]
  logits = []
  for piece in pieces:
    out, variables = decode(cache, piece)
    cache = variables['cache']
    logits.append(out)
  np.testing.assert_allclose(np.concatenate(logits, axis=1), full, atol=1e-5)


def test_generate_reproducible_by_seed():
  model, params = _model_and_params()
  prompt = np.array([1, 2, 3])
  run = lambda seed: sample.generate(model, params, prompt, 8, temperature=1.0, top_k=0,
                                     rng=jax.random.key(seed))
  first = run(0)
  assert first.shape == (8,) and first.dtype.kind == 'i'
  assert ((0 <= first) & (first < TINY.vocab_size)).all()
  np.testing.assert_array_equal(run(0), first)
  assert any((run(seed) != first).any() for seed in range(1, 6))


def test_greedy_is_argmax_of_full_forward_and_top1_matches():
  model, params = _model_and_params()
  prompt = np.array([4, 1])
  greedy = sample.generate(model, params, prompt, 6, temperature=0.0, top_k=0,
                           rng=jax.random.key(0))
  # Greedy decoding by hand with the uncached model; padding after the last token is harmless
  # to a causal model and keeps one compiled shape.
  apply = jax.jit(model.apply)
  tokens = list(prompt)
  for _ in range(6):
    padded = np.zeros((1, TINY.seq_len), np.int32)
    padded[0, :len(tokens)] = tokens
    logits = apply({'params': params}, padded)
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  np.testing.assert_array_equal(greedy, tokens[len(prompt):])
  top1 = sample.generate(model, params, prompt, 6, temperature=0.7, top_k=1,
                         rng=jax.random.key(3))
  np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize('temperature, top_k', [(0.5, 0), (2.0, 0), (0.7, 3)])
def test_sampling_draws_from_the_softmax_at_the_temperature(temperature, top_k):
  """One draw per row equals jax.random.categorical of logits / T (after top-k) with the same
  key: the same key at another temperature draws other tokens, so ignoring T shows."""
  logits = jax.random.normal(jax.random.key(0), (256, TINY.vocab_size)) * 3
  key = jax.random.key(7)
  got = sample._choose(logits, key, jnp.float32(temperature), top_k, False)
  scaled = logits / temperature
  if top_k:
    kth = jnp.sort(scaled, axis=-1)[:, -top_k][:, None]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    top = np.argsort(np.asarray(logits), axis=-1)[:, -top_k:]
    assert (top == np.asarray(got)[:, None]).any(axis=1).all()
  np.testing.assert_array_equal(got, jax.random.categorical(key, scaled, axis=-1))
  untempered = jax.random.categorical(key, jnp.where(jnp.isinf(scaled), -jnp.inf, logits),
                                      axis=-1)
  assert (np.asarray(got) != np.asarray(untempered)).mean() > 0.05  # T matters at this key.


def test_a_cold_temperature_samples_the_greedy_tokens():
  """Through generate: T=0.01 sharpens the softmax onto the argmax; T=1 would not."""
  model, params = _model_and_params()
  prompt = np.array([4, 1])
  greedy = sample.generate(model, params, prompt, 8, temperature=0.0, top_k=0,
                           rng=jax.random.key(0))
  cold = sample.generate(model, params, prompt, 8, temperature=0.01, top_k=0,
                         rng=jax.random.key(5))
  np.testing.assert_array_equal(cold, greedy)
  warm = [sample.generate(model, params, prompt, 8, temperature=1.0, top_k=0,
                          rng=jax.random.key(seed)) for seed in range(5, 8)]
  assert any((w != greedy).any() for w in warm)  # So the check above can fail.


def test_generation_past_the_context_slides_the_window():
  """Past seq_len, each window restarts from the last seq_len // 2 tokens, greedily checked."""
  model, params = _model_and_params()
  prompt, n = np.array([4, 1, 7]), 2 * TINY.seq_len
  greedy = sample.generate(model, params, prompt, n, temperature=0.0, top_k=0,
                           rng=jax.random.key(0))
  assert greedy.shape == (n,)
  apply = jax.jit(model.apply)
  tokens, start = list(prompt), 0
  for _ in range(n):
    if len(tokens) - start == TINY.seq_len:  # The window is full: keep its second half.
      start = len(tokens) - TINY.seq_len // 2
    window = tokens[start:]
    padded = np.zeros((1, TINY.seq_len), np.int32)
    padded[0, :len(window)] = window
    tokens.append(int(np.argmax(apply({'params': params}, padded)[0, len(window) - 1])))
  np.testing.assert_array_equal(greedy, tokens[len(prompt):])


def test_bad_sampling_arguments_are_config_errors():
  model, params = _model_and_params()
  for kwargs, needle in (({'temperature': -1.0, 'top_k': 0}, 'temperature'),
                         ({'temperature': float('nan'), 'top_k': 0}, 'temperature=nan'),
                         ({'temperature': float('inf'), 'top_k': 0}, 'temperature=inf'),
                         ({'temperature': 1.0, 'top_k': -1}, 'top_k'),
                         ({'temperature': 1.0, 'top_k': 99}, 'top_k')):
    with pytest.raises(ConfigError, match=needle):
      sample.generate(model, params, np.array([1]), 4, rng=jax.random.key(0), **kwargs)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir lm.main trained on two devices (it splits the CPU)."""
  workdir = tmp_path_factory.mktemp('trained')
  config = os.path.join(ROOT, 'tests', 'tiny_config.py')
  result = subprocess.run(
      [sys.executable, '-m', 'lm.main', f'--config={config}', f'--workdir={workdir}',
       '--config.train.steps=10', '--config.train.checkpoint_every=5', '--config.mesh.data=2'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return workdir


def _sample(workdir, *args):
  return subprocess.run([sys.executable, '-m', 'lm.sample', f'--workdir={workdir}', *args],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_cli_samples_on_one_device_what_several_trained(trained):
  """lm.main splits the CPU into devices; lm.sample restores onto one."""
  sampled = _sample(trained, '--prompt=ROMEO:', '--max_new_tokens=20', '--seed=0')
  assert sampled.returncode == 0, sampled.stderr
  assert sampled.stdout.startswith('ROMEO:') and len(sampled.stdout.strip()) >= 20


@pytest.mark.parametrize('args,needle', [
    # The char tokenizer used to drop these silently and continue 'ROMEO'.
    (['--prompt=ROMEO€ü'], "the prompt has characters the model has no token for: 'ü', '€'"),
    (['--temperature=nan'], 'temperature=nan must be a finite number'),  # Was: exit 0.
    (['--temperature=-inf'], 'temperature=-inf'),
    (['--top_k=-3'], 'top_k=-3 must be in [0, vocab_size='),
    (['--top_k=inf'], 'flag --top_k=inf'),  # Was: absl's two lines and exit 1.
    (['--max_new_tokens=0'], 'max_new_tokens=0 must be positive'),
])
def test_cli_bad_input_is_one_line_and_exit_2(trained, args, needle):
  result = _sample(trained, *args)
  assert result.returncode == 2, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], lines
  assert result.stdout == ''


def test_cli_corrupt_checkpoint_is_one_line(trained, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(trained, workdir)
  data_files = glob.glob(str(workdir / 'checkpoints' / '10' / '**' / 'd' / '*'), recursive=True)
  for path in data_files:
    os.truncate(path, os.path.getsize(path) // 2)
  result = _sample(workdir)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f'error: checkpoint {workdir}/checkpoints/10 cannot be restored')
  assert lines[0].endswith(f'move it away (mv {workdir}/checkpoints/10 {workdir}/corrupt-10) '
                           'and run again to use checkpoint 5'), lines[0]
