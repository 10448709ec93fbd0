"""Every test sees 8 fake CPU devices, so sharding is exercised without accelerators.

Tests that need ../shared, root or a Slurm cluster skip without them; the run ends with one
line saying what skipped and why, so a green run on a fresh clone does not hide them. Under
`CI` (set by .ci/run, where all of those exist) a skip fails the test instead, unless its
reason says it needs a GPU.
"""

import collections
import importlib.util
import os
import re
import shutil
import tempfile

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One JAX compilation cache for the run, shared by the xdist workers and by the processes the
# tests start (they inherit the environment): most tests compile the same few tiny programs.
# JAX keys an entry by the program, the flags and the devices, so nothing stale is reused.
# A JAX_COMPILATION_CACHE_DIR set by the caller (tests/breakages.py, or '' for none) stands.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='lm-tests-jax-cache-')
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# tests/breakages.py runs the tests in a broken copy of the repository; this makes sure they
# test that copy's lm, not another checkout's (an editable install, a PYTHONPATH entry).
_EXPECTED_ROOT = os.environ.get('LM_TESTS_EXPECTED_ROOT')
if _EXPECTED_ROOT:
  import lm  # pylint: disable=g-import-not-at-top
  if not os.path.abspath(lm.__file__).startswith(os.path.join(os.path.abspath(_EXPECTED_ROOT),
                                                              '')):
    raise RuntimeError(f'the tests import lm from {lm.__file__}, not from {_EXPECTED_ROOT}')


_GPU_ONLY = re.compile(r'\bGPU', re.IGNORECASE)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def load_benchmark():
  """load_benchmark('compression') -> benchmarks/compression.py as a fresh module (the
  benchmarks are scripts, not a package)."""
  def load(name: str):
    spec = importlib.util.spec_from_file_location(
        f'benchmark_{name}', os.path.join(_ROOT, 'benchmarks', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return load


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  return reason.removeprefix('Skipped: ')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del item, call
  outcome = yield
  report = outcome.get_result()
  if (os.environ.get('CI') and report.skipped and not hasattr(report, 'wasxfail') and
      not _GPU_ONLY.search(_skip_reason(report))):
    report.outcome = 'failed'
    report.longrepr = (f'skipped under CI, where everything but GPU-only tests must run: '
                       f'{_skip_reason(report)}')


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
  yield  # After the short test summary: the last line before the counts.
  skipped = [r for r in terminalreporter.stats.get('skipped', []) if not hasattr(r, 'wasxfail')]
  if not skipped:
    return
  reasons = collections.Counter(_skip_reason(r) for r in skipped)
  terminalreporter.write_line(
      f'{len(skipped)} skipped: ' +
      '; '.join(f'{count} x {reason}' for reason, count in reasons.most_common()),
      yellow=True, bold=True)
