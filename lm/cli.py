"""Flags the command-line tools share.

absl keeps one flag registry per process, so a flag two tools define must be defined once:
`lm.main`, `lm.sample`, `lm.predict` and `lm.quantize` all read a run's directory from `--workdir`.
"""

import sys

from absl import flags

WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory: checkpoints, metrics, '
                              'config.json and logs (written by lm.main, read by the others).')


def parse_flags(argv):
  """absl's parsing for `app.run(..., flags_parser=)`, but a bad flag is one `error:` line and
  exit code 2, as in lm.main."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr, flush=True)
    sys.exit(2)
