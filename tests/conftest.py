"""Every test sees 8 fake CPU devices, so sharding is exercised without accelerators."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# tests/breakages.py runs the tests in a broken copy of the repository; this makes sure they
# test that copy's lm, not another checkout's (an editable install, a PYTHONPATH entry).
_EXPECTED_ROOT = os.environ.get('LM_TESTS_EXPECTED_ROOT')
if _EXPECTED_ROOT:
  import lm  # pylint: disable=g-import-not-at-top
  if not os.path.abspath(lm.__file__).startswith(os.path.join(os.path.abspath(_EXPECTED_ROOT),
                                                              '')):
    raise RuntimeError(f'the tests import lm from {lm.__file__}, not from {_EXPECTED_ROOT}')
