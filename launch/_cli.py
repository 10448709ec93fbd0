"""Command-line pieces every launcher shares: `launcher flags -- trainer flags`."""

import sys


class UsageError(ValueError):
  """Bad launcher input: reported as one `error:` line with exit code 2."""


def split(argv: list[str]) -> tuple[list[str], list[str]]:
  """Splits at the first `--`: what is after it goes to `lm.main` untouched."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def flag_value(args: list[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in trainer args (the last one wins, as in absl)."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def require_trainer_flags(args: list[str], launcher: str) -> tuple[str, str]:
  """Returns (config, workdir) from the trainer args, or explains how to pass them."""
  config, workdir = flag_value(args, 'config'), flag_value(args, 'workdir')
  if not config or not workdir:
    raise UsageError(
        f'pass the trainer flags after --, e.g. python -m launch.{launcher} ... -- '
        '--config=experiments/shakespeare_char.py --workdir=/tmp/run')
  return config, workdir


def fail(message: str, code: int = 2):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)
