"""Process set-up around JAX's backend: XLA flags for GPUs and the persistent compile cache.

XLA reads XLA_FLAGS once, when the first backend starts, so `set_gpu_xla_flags` runs before
anything touches a device and judges whether this will be a GPU run from the environment.
"""

import glob
import importlib.util
import os

# On by default in NVIDIA's JAX containers and in the JAX GPU performance guide: lets XLA
# schedule collectives (and the FSDP all-gathers) to overlap compute. Checked to parse with
# this XLA (tests/test_runtime.py): an unknown flag aborts the process.
GPU_XLA_FLAGS = ('--xla_gpu_enable_latency_hiding_scheduler=true',)
CACHE_DIR = os.path.join('~', '.cache', 'lm', 'jax')
_CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin', 'jax_plugins.xla_cuda13',
                 'jax_plugins.xla_cuda12')


def gpu_expected() -> bool:
  """Whether JAX will start on an NVIDIA GPU, judged without starting it."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0] in ('cuda', 'gpu')
  if not (os.path.exists('/dev/nvidiactl') or glob.glob('/dev/nvidia[0-9]*')):
    return False
  for name in _CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ImportError:  # A missing parent package (jax_plugins).
      continue
  return False


def set_gpu_xla_flags() -> tuple[str, ...]:
  """GPU_XLA_FLAGS into XLA_FLAGS when this is a GPU run and XLA_FLAGS is not set at all (a
  user who set it, even to '', keeps exactly what they set). Returns the flags added."""
  if 'XLA_FLAGS' in os.environ or not gpu_expected():
    return ()
  os.environ['XLA_FLAGS'] = ' '.join(GPU_XLA_FLAGS)
  return GPU_XLA_FLAGS


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: off).

  JAX_COMPILATION_CACHE_DIR, when set, decides (JAX reads it itself; '' turns the cache off).
  Otherwise accelerators cache under ~/.cache/lm/jax, where a restart skips minutes of
  compiling; CPU runs do not, unless that variable asks (docs/BENCHMARKS.md has the CPU
  second-start times). Call after the backend may start, before the first compile.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return os.environ['JAX_COMPILATION_CACHE_DIR'] or None
  if jax.default_backend() == 'cpu':
    return None
  path = os.path.expanduser(CACHE_DIR)
  jax.config.update('jax_compilation_cache_dir', path)
  return path
