"""Loss curves from one or more workdirs to a PNG; prints the PNG's path.

  python -m lm.plot /tmp/sh /tmp/sh2 [--out=/tmp/loss.png] [--keys=train/loss,eval/loss]

Without --out the PNG is `<first workdir>/loss.png`, beside the metrics it draws.
"""

import os
import sys

from absl import app
from absl import flags

from lm import metrics as metrics_lib

_OUT = flags.DEFINE_string('out', '', 'PNG to write (default: <first workdir>/loss.png).')
_KEYS = flags.DEFINE_list('keys', ['train/loss', 'eval/loss'], 'Metrics to draw, one panel each.')
_LOG_Y = flags.DEFINE_bool('log_y', False, 'Log-scale y axis.')


def plot(workdirs: list[str], out: str, keys=('train/loss', 'eval/loss'), log_y=False) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
  drawn = 0
  # Read once per workdir, so a torn line is warned about once, not once per panel.
  runs = {workdir: metrics_lib.read(workdir) for workdir in workdirs}
  for ax, key in zip(axes[0], keys):
    for workdir, run in runs.items():
      rows = [r for r in run if key in r]
      if rows:
        ax.plot([r['step'] for r in rows], [r[key] for r in rows], marker='.' if
                len(rows) < 30 else None, label=os.path.basename(os.path.normpath(workdir)))
        drawn += 1
    ax.set(title=key, xlabel='step')
    if log_y:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if not drawn:
    raise ValueError(f'none of {list(keys)} found in metrics.jsonl of {workdirs}')
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    print('error: name one or more workdirs: python -m lm.plot /tmp/a /tmp/b [--out=loss.png]',
          file=sys.stderr)
    sys.exit(2)
  missing = [w for w in workdirs if not os.path.exists(os.path.join(w, 'metrics.jsonl'))]
  if missing:
    print(f'error: no metrics.jsonl in {", ".join(missing)}; train there first', file=sys.stderr)
    sys.exit(2)
  try:
    out = _OUT.value or os.path.join(workdirs[0], 'loss.png')
    print(plot(workdirs, out, _KEYS.value, _LOG_Y.value))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
