"""Training batches built ahead of the step that needs them, on one thread, already on device.

The training loop asks for step s's batch; a `Prefetcher` of depth d has already started
building steps s+1 .. s+d (host assembly and the copy to the devices) while the device runs
the steps before. A batch is a pure function of its step, so building it early changes when,
never what. Depth 0 builds each batch when asked, on the caller's thread.
"""

import concurrent.futures
from typing import Any, Callable
import weakref


def depth(requested: int, backend: str) -> int:
  """data.prefetch: -1 means 2 batches ahead on an accelerator and none on CPU, where the
  builder thread would take a core from XLA's own."""
  if requested >= 0:
    return requested
  return 0 if backend == 'cpu' else 2


class Prefetcher:
  """`get(step)` returns make(step), with the next `depth` steps (up to `stop`) already begun."""

  def __init__(self, make: Callable[[int], Any], stop: int, depth: int):
    self._make, self._stop, self._depth = make, stop, depth
    self._pending = {}  # step -> Future.
    self._pool = None
    if depth > 0:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='prefetch')
      # A loop that returns or raises drops its prefetcher: the batches built ahead go too.
      weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

  def get(self, step: int):
    if self._pool is None:
      return self._make(step)
    for ahead in range(step, min(step + self._depth + 1, self._stop)):
      if ahead not in self._pending:
        self._pending[ahead] = self._pool.submit(self._make, ahead)
    for old in [s for s in self._pending if s < step]:  # Asked out of order: not needed now.
      self._pending.pop(old).cancel()
    return self._pending.pop(step).result()
