r"""Samples text from a trained language model with a KV cache.

  python -m lm.sample --workdir=/tmp/sh --prompt="ROMEO:" --max_new_tokens=200 \
      --temperature=0.8 --top_k=40 --seed=0

Shape key: B: batch (1 here), P: prompt length, N: new tokens, S: cache length, V: vocab size.
"""

import functools
import math
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from lm import cli
from lm import model as model_lib
from lm.config import ConfigError

_WORKDIR = cli.WORKDIR
_PROMPT = flags.DEFINE_string('prompt', '\n', 'Text to continue.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 40, 'Sample among the k likeliest tokens; 0 is all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def _choose(logits_BxV, rng, temperature, top_k: int, greedy: bool):
  """Next token ids [B]: greedy, else a (top-k) softmax sample at `temperature`."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth_BxK = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_BxK, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'top_k', 'greedy'))
def _generate(model, params, cache, prompt_BxP, rng, temperature, *, max_new_tokens, top_k,
              greedy):
  """Prefills the cache with the prompt in one call, then scans one token per step."""
  def apply(tokens, cache):
    logits, variables = model.apply({'params': params, 'cache': cache}, tokens, decode=True,
                                    mutable=['cache'])
    return logits[:, -1], variables['cache']

  logits_BxV, cache = apply(prompt_BxP, cache)

  def step(carry, step_rng):
    logits_BxV, cache = carry
    token_B = _choose(logits_BxV, step_rng, temperature, top_k, greedy).astype(jnp.int32)
    logits_BxV, cache = apply(token_B[:, None], cache)
    return (logits_BxV, cache), token_B

  # The last step's logits go unused; one wasted forward keeps the loop body uniform.
  _, tokens_NxB = jax.lax.scan(step, (logits_BxV, cache), jax.random.split(rng, max_new_tokens))
  return tokens_NxB.T


def generate(model: model_lib.Transformer, params, prompt_tokens: np.ndarray,
             max_new_tokens: int, *, temperature: float, top_k: int, rng) -> np.ndarray:
  """Continues `prompt_tokens` [P] by `max_new_tokens`; returns only the new tokens [N].

  Past the model's context (seq_len), generation continues in windows, as nanoGPT crops its
  context: the last seq_len // 2 tokens are prefilled into a fresh cache and the rest of the
  window is sampled with the cache, so every token sees at least half a context.
  """
  cfg = model.config
  prompt_P = np.asarray(prompt_tokens, np.int32).reshape(-1)
  if prompt_P.size == 0:
    raise ConfigError('the prompt is empty; give at least one token')
  if max_new_tokens <= 0:
    raise ConfigError(f'max_new_tokens={max_new_tokens} must be positive')
  if not math.isfinite(temperature) or temperature < 0:
    raise ConfigError(f'temperature={temperature} must be a finite number >= 0 (0 is greedy)')
  if not 0 <= top_k <= cfg.vocab_size:
    raise ConfigError(f'top_k={top_k} must be in [0, vocab_size={cfg.vocab_size}]')
  tokens, new = list(prompt_P[-(cfg.seq_len - 1):]), []
  while len(new) < max_new_tokens:
    keep = len(tokens) if not new else min(len(tokens), cfg.seq_len // 2)
    context_P = np.asarray(tokens[-keep:], np.int32)
    count = min(max_new_tokens - len(new), cfg.seq_len - keep)
    rng, chunk_rng = jax.random.split(rng)
    cache = model_lib.init_cache(model, batch_size=1, max_len=keep + count)
    # Temperature is traced, so changing it reuses the compiled sampler.
    chunk_BxN = _generate(model, params, cache, jnp.asarray(context_P[None]), chunk_rng,
                          jnp.float32(temperature), max_new_tokens=count, top_k=int(top_k),
                          greedy=temperature == 0)
    chunk = [int(t) for t in np.asarray(chunk_BxN[0])]
    new += chunk
    tokens += chunk
  return np.asarray(new, np.int32)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # Keep orbax's restore chatter off the output.
  # Imported here so sampling code stays usable without the training stack.
  from lm import data, quantize  # pylint: disable=g-import-not-at-top
  from lm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    if not _WORKDIR.value:
      raise ConfigError('--workdir is required: the directory a training run wrote')
    config, params = quantize.restore_for_inference(_WORKDIR.value)  # A run or an export.
    tokenizer = data.load_tokenizer(_WORKDIR.value)
    cfg = model_lib.TransformerConfig.from_config(config.model, tokenizer.vocab_size)
    unknown = tokenizer_lib.unknown_chars(tokenizer, _PROMPT.value)
    if unknown:
      # The char tokenizer would drop them silently, and the model would continue another text.
      raise ConfigError(f'the prompt has characters the model has no token for: '
                        f'{", ".join(repr(c) for c in unknown)}; leave them out (the '
                        f'training text of {_WORKDIR.value} never had them)')
    prompt = tokenizer.encode(_PROMPT.value)
    model = quantize.wrap_model(model_lib.Transformer(cfg), quantize.mode(config.quant))
    new = generate(model, params, prompt, _MAX_NEW_TOKENS.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                   rng=jax.random.key(_SEED.value))
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(_PROMPT.value + tokenizer.decode(new))



if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
