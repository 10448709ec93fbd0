"""tests/conftest.py: skips are summed up in one line, and are failures under CI."""

import os

import pytest

pytest_plugins = ('pytester',)

_TESTS = '''
import pytest

needs_shared = pytest.mark.skipif(True, reason='no prepared TFDS data dir at ../shared/tfds')

@needs_shared
def test_a():
  pass

@needs_shared
def test_b():
  pass

def test_c():
  pytest.skip('needs root to mount a tmpfs')

@pytest.mark.skipif(True, reason='needs a GPU')
def test_d():
  pass

def test_e():
  assert True
'''


@pytest.fixture
def session(pytester, monkeypatch):
  with open(os.path.join(os.path.dirname(__file__), 'conftest.py')) as f:
    pytester.makeconftest(f.read())
  pytester.makepyfile(test_inner=_TESTS)

  def run(ci: str | None):
    if ci is None:
      monkeypatch.delenv('CI', raising=False)
    else:
      monkeypatch.setenv('CI', ci)
    return pytester.runpytest_subprocess('-p', 'no:cacheprovider')
  return run


def test_a_run_ends_with_one_line_of_skips_and_their_reasons(session):
  result = session(None)
  result.assert_outcomes(passed=1, skipped=4)
  lines = [l for l in result.outlines if l.startswith('4 skipped: ')]
  assert lines == ['4 skipped: 2 x no prepared TFDS data dir at ../shared/tfds; '
                   '1 x needs root to mount a tmpfs; 1 x needs a GPU'], result.outlines


def test_under_ci_a_skip_fails_unless_it_needs_a_gpu(session):
  result = session('1')
  # A skip at set-up (a skipif mark) turns into an error, one in the test body into a failure.
  result.assert_outcomes(passed=1, failed=1, errors=2, skipped=1)
  assert result.ret != 0
  assert 'skipped under CI, where everything but GPU-only tests must run: needs root' in (
      result.stdout.str())
  assert '1 skipped: 1 x needs a GPU' in result.outlines
