"""benchmarks/accelerator.py: `--smoke` runs every item on CPU and writes the table and JSON.

The GPU figures themselves are recorded in docs/BENCHMARKS.md when a GPU is there; this test
keeps the one command that measures them from rotting in between.
"""

import json
import math
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, 'benchmarks', 'accelerator.py')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  # Its own temp dir, to see what the run leaves there: only the JSON (no --output given).
  tmp = tmp_path_factory.mktemp('accelerator_tmp')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['TMPDIR'] = str(tmp)
  proc = subprocess.run([sys.executable, _SCRIPT, '--smoke'], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  out = proc.stdout.rsplit('JSON: ', 1)[1].strip()
  with open(out) as f:
    return proc.stdout, json.load(f), os.path.relpath(out, tmp), sorted(os.listdir(tmp))


def test_smoke_runs_every_item_and_records_versions(smoke, load_benchmark):
  _, report, _, _ = smoke
  items = {r['item']: r for r in report['items']}
  assert list(items) == list(load_benchmark('accelerator').ITEMS)
  assert not report['failed'] and not report['skipped']
  assert report['smoke'] and report['platform'] == 'cpu'
  for r in items.values():
    assert r['ok'] and r['device'] and r['jax'] and r['jaxlib'], r
    assert r['overrides'] and r['experiment'].startswith('experiments/'), r
    assert r['compile_s'] > 0 and r['peak_host_rss_bytes'] > 0, r
  for name in ('gpt2_small', 'largest_lm'):
    r = items[name]
    assert r['unit'] == 'tokens/s' and r['figure'] > 0 and math.isfinite(r['loss'])
    assert 0 < r['mfu'] < 1 and r['plan']['step_ms'] > 0 and r['plan']['memory_bytes'] > 0
  largest = items['largest_lm']
  assert largest['overrides']['model.scan_layers'] is True
  # The remat search compiled the step and took the first policy that fits.
  assert largest['overrides']['model.remat'] == 'none'
  assert any(n.startswith('remat none: the compiled step needs') for n in largest['notes'])
  for name in ('resnet20', 'wrn16_4', 'wrn28_10', 'seed_cnn'):
    assert items[name]['unit'] == 'images/s' and items[name]['figure'] > 0
  r9 = items['resnet9']
  # Random images: 94% is out of reach, and the table must say so rather than print a time.
  assert r9['figure'] is None and 0 <= r9['final_accuracy'] <= 1
  assert r9['curve'][-1][0] == r9['steps'] and r9['train_s'] > 0 and r9['eval_compile_s'] > 0


def test_smoke_prints_a_row_per_item_and_the_planner_beside_the_measurement(smoke):
  stdout, report, _, _ = smoke
  rows = [line for line in stdout.splitlines() if line.startswith('| ')]
  for r in report['items']:
    assert any(row.startswith(f'| {r["item"]} |') for row in rows), r['item']
  assert '| resnet9 | not reached |' in stdout
  step_rows = [row for row in rows if row.startswith('| step time |')]
  assert len(step_rows) == 2  # gpt2_small and largest_lm: predicted, then measured.
  assert 'JSON: ' in stdout


def test_smoke_leaves_only_its_json_in_the_temp_dir(smoke):
  # The CIFAR splits, the compilation cache and the items' workdirs are removed at the end.
  _, _, json_path, left = smoke
  assert left == [json_path] and json_path.endswith('.json'), left


def test_table_reports_failed_and_skipped_items(load_benchmark):
  accelerator = load_benchmark('accelerator')
  text = accelerator.table(
      [{'item': 'gpt2_small', 'ok': False, 'wall_s': 3.0, 'error': 'exit code 1: OOM | bad'}],
      ['wrn28_10'])
  assert '| gpt2_small | failed |' in text and 'OOM / bad' in text
  assert '| wrn28_10 | skipped: over the wall budget |' in text


def test_unknown_item_is_an_error_before_anything_runs(capsys, load_benchmark):
  assert load_benchmark('accelerator').main(['--only=gpt3', '--smoke']) == 2
  assert 'unknown item' in capsys.readouterr().err
