"""Flags the command-line tools share.

absl keeps one flag registry per process, so a flag two tools define must be defined once:
`lm.main`, `lm.sample` and `lm.predict` all read a run's directory from `--workdir`.
"""

from absl import flags

WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory: checkpoints, metrics, '
                              'config.json and logs (written by lm.main, read by the others).')
