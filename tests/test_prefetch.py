"""Tests for lm/prefetch.py: batches built ahead are the batches asked for, in any order."""

import threading

from lm import prefetch


def test_depth_defaults_to_two_on_accelerators_and_none_on_cpu():
  assert prefetch.depth(-1, 'cpu') == 0
  assert prefetch.depth(-1, 'gpu') == prefetch.depth(-1, 'tpu') == 2
  assert prefetch.depth(3, 'cpu') == 3 and prefetch.depth(0, 'gpu') == 0


def test_builds_the_next_steps_ahead_and_returns_each_step_its_own_batch():
  made, lock = [], threading.Lock()
  started = {s: threading.Event() for s in range(10)}

  def make(step):
    with lock:
      made.append(step)
    started[step].set()
    return {'step': step}

  p = prefetch.Prefetcher(make, stop=10, depth=2)
  assert p.get(0) == {'step': 0}
  # Steps 1 and 2 are built without being asked for.
  assert started[1].wait(5) and started[2].wait(5)
  assert [p.get(s)['step'] for s in range(1, 10)] == list(range(1, 10))
  assert sorted(made) == list(range(10))  # Nothing past `stop`, nothing twice.


def test_out_of_order_and_inline():
  p = prefetch.Prefetcher(lambda s: s * s, stop=100, depth=3)
  assert [p.get(s) for s in (5, 6, 2, 50, 51)] == [25, 36, 4, 2500, 2601]
  calls = []
  inline = prefetch.Prefetcher(lambda s: calls.append(threading.current_thread().name) or s,
                               stop=5, depth=0)
  assert [inline.get(s) for s in range(3)] == [0, 1, 2]
  assert calls == [threading.current_thread().name] * 3  # Depth 0: on the caller's thread.
