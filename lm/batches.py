"""Which examples make each batch, as a pure function of (seed, step, process).

Shape key: N examples, G global batch, B this process's rows (G / process count).

Training walks the examples epoch by epoch in an order drawn from `default_rng([seed, epoch])`
(with oversampling: N weighted draws with replacement from the same generator), so resuming
at step s replays exactly the batches an uninterrupted run would have seen. Every process
computes the whole global batch [G] (cheap: G integers) and keeps its own contiguous slice, so
the global batch does not depend on the process count.
"""

import numpy as np

from lm.config import ConfigError


def check_batch(batch_size: int, process_count: int = 1, data_shards: int = 1,
                grad_accum_steps: int = 1) -> None:
  """The one check that a global batch splits over processes, data shards and micro-batches."""
  if batch_size <= 0:
    raise ConfigError(f'train.batch_size={batch_size} must be positive; set '
                      '--config.train.batch_size')
  if grad_accum_steps <= 0:
    raise ConfigError(f'train.grad_accum_steps={grad_accum_steps} must be positive')
  if batch_size % process_count:
    raise ConfigError(f'train.batch_size={batch_size} does not split over {process_count} '
                      f'processes; set --config.train.batch_size to a multiple of {process_count}')
  if batch_size % (data_shards * grad_accum_steps):
    raise ConfigError(
        f'train.batch_size={batch_size} must be divisible by the {data_shards} data shards '
        f'(mesh data*fsdp) x train.grad_accum_steps={grad_accum_steps}; '
        f'use a multiple of {data_shards * grad_accum_steps}')


def local(x_G: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous rows of a global batch: [G, ...] -> [B, ...]."""
  b = len(x_G) // process_count
  return x_G[process_index * b:(process_index + 1) * b]


class Rows:
  """Example indices of every training batch and of the padded evaluation batches."""

  def __init__(self, num_examples: int, batch_size: int, seed: int, *, process_index: int = 0,
               process_count: int = 1, weights_N: np.ndarray | None = None):
    check_batch(batch_size, process_count)
    if num_examples < batch_size:
      raise ConfigError(f'train.batch_size={batch_size} exceeds the {num_examples} training '
                        'examples; use a smaller batch')
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = num_examples // batch_size  # The last partial batch is dropped.
    self._p_N = None
    if weights_N is not None:
      self._p_N = np.asarray(weights_N, np.float64) / np.sum(weights_N)
    self._memo = (None, None)

  def local(self, x_G: np.ndarray) -> np.ndarray:
    return local(x_G, self.process_index, self.process_count)

  def _order(self, epoch: int) -> np.ndarray:
    # Only a memo: the order is a function of (seed, epoch). One tuple read and one write keep
    # it safe if a prefetch thread asks for another epoch at the same time.
    memo_epoch, order_N = self._memo
    if memo_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      if self._p_N is None:
        order_N = rng.permutation(self.num_examples)
      else:
        order_N = rng.choice(self.num_examples, self.num_examples, p=self._p_N)
      self._memo = (epoch, order_N)
    return order_N

  def train(self, step: int) -> np.ndarray:
    """Indices of step `step`'s global batch, [G]."""
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

  def augment_rng(self, step: int) -> np.random.Generator:
    """The generator of step `step`'s random augmentation (draw for [G], then slice)."""
    return np.random.default_rng([self.seed, step, 1])

  def eval(self, num_examples: int, eval_batch_size: int):
    """Yields (rows_B, valid_B) covering `num_examples` once, in global batches of
    `eval_batch_size` padded with invalid rows (row 0, valid False); this process's part."""
    if eval_batch_size % self.process_count:
      raise ConfigError(f'eval batch {eval_batch_size} is not divisible by the process count '
                        f'{self.process_count}')
    for start in range(0, num_examples, eval_batch_size):
      rows_B = self.local(np.arange(start, start + eval_batch_size))
      valid_B = rows_B < num_examples
      yield np.where(valid_B, rows_B, 0), valid_B


_SPLIT_SEED = 0  # Held-out and low-label subsets do not move with `config.seed`.


def hold_out(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(kept rows, held-out rows) of n examples: a fixed random `fraction` held out, sorted."""
  n_held = int(round(fraction * n))
  perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
  return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def subset(n: int, fraction: float) -> np.ndarray:
  """A fixed random `fraction` of n rows (data.train_fraction: training with fewer labels).

  Drawn from another stream than `hold_out`, so a subset is not the held-out rows' complement.
  """
  if not 0 < fraction <= 1:
    raise ConfigError(f'data.train_fraction={fraction} must be in (0, 1]')
  keep = max(1, int(round(fraction * n)))
  return np.sort(np.random.default_rng([_SPLIT_SEED, 1]).permutation(n)[:keep])


_MIN_EVAL_BATCH = 512  # Evaluation uses big batches: no gradients, and batch 4 would crawl.


def eval_batch_size(requested: int, batch_size: int) -> int:
  """`requested`, or (0) the smallest multiple of the training batch that is at least 512."""
  return requested or batch_size * max(1, _MIN_EVAL_BATCH // batch_size)
