"""Tests for lm/runtime.py: the GPU XLA flags and the persistent compilation cache."""

import json
import os
import subprocess
import sys

from lm import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_flags_parse_with_this_xla():
  # XLA aborts the process on a flag it does not know, so a renamed flag would kill every
  # GPU run at its first device call. CPU and GPU builds of a jaxlib share the flag table.
  env = {**os.environ, 'XLA_FLAGS': ' '.join(runtime.GPU_XLA_FLAGS), 'JAX_PLATFORMS': 'cpu'}
  bad = {**env, 'XLA_FLAGS': '--xla_gpu_no_such_flag=true'}
  check = [sys.executable, '-c', 'import jax; jax.numpy.zeros(1).block_until_ready()']
  assert subprocess.run(check, env=env, capture_output=True).returncode == 0
  assert subprocess.run(check, env=bad, capture_output=True).returncode != 0  # The check bites.


def test_gpu_flags_only_on_a_gpu_and_never_over_the_users(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert runtime.set_gpu_xla_flags() == () and 'XLA_FLAGS' not in os.environ
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert runtime.set_gpu_xla_flags() == runtime.GPU_XLA_FLAGS
  assert os.environ['XLA_FLAGS'] == ' '.join(runtime.GPU_XLA_FLAGS)
  monkeypatch.setenv('XLA_FLAGS', '')  # Set, even empty: the user's choice stands.
  assert runtime.set_gpu_xla_flags() == () and os.environ['XLA_FLAGS'] == ''


_COMPILE_TWICE = '''
import json, os, sys
import jax
from jax import monitoring
from lm import config as config_lib, runtime, train
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = runtime.enable_compilation_cache()
config = config_lib.load(os.path.join(sys.argv[1], 'tests', 'tiny_config.py'))
config.mesh.data = 1
counts = []
for attempt in range(2):
  jax.clear_caches()  # Only the persistent cache can now spare the second compile.
  events.clear()
  trainer = train.Trainer(config, '/nonexistent-cache-test', devices=jax.devices()[:1])
  trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
  counts.append({'hits': events.count('/jax/compilation_cache/cache_hits'),
                 'files': len(os.listdir(path))})
print(json.dumps({'path': path, 'counts': counts}))
'''


def test_compilation_cache_is_written_and_reused(tmp_path):
  cache = tmp_path / 'cache'
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'PYTHONPATH': REPO}
  out = subprocess.run([sys.executable, '-c', _COMPILE_TWICE, REPO], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  first, second = result['counts']
  assert result['path'] == str(cache)
  assert first['hits'] == 0 and first['files'] > 0  # Written by the first compile...
  assert second['hits'] >= 1 and second['files'] == first['files']  # ... read by the second.


def test_no_cache_on_cpu_unless_asked(monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  assert runtime.enable_compilation_cache() is None  # Tests run on the CPU backend.
