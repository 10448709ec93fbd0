"""benchmarks/transfer.py: a recipe variant (--extra/--tag) runs the cell's command with its
flags and gets its own rows in the table."""

import os

import pytest


def test_extra_needs_a_tag(load_benchmark):
  with pytest.raises(SystemExit):
    load_benchmark('transfer')._parse_args(['--extra=--config.optim.lr=3e-4'])


def test_a_tagged_cell_runs_with_its_flags_and_reports_under_its_own_name(monkeypatch, tmp_path,
                                                                          load_benchmark):
  module = load_benchmark('transfer')
  ran = []

  def fake_run(cmd, workdir):
    ran.append((cmd, workdir))
    return {'records': [{'step': 105, 'eval/accuracy': 0.6}], 'wall_s': 90.0, 'load': [1.0, 1.0],
            'command': ' '.join(cmd)}
  monkeypatch.setattr(module, '_run', fake_run)
  args = module._parse_args(['--pretrained=/tmp/pre', f'--workdir_root={tmp_path}',
                             '--tag=lr3e-4', '--extra=--config.optim.lr=3e-4'])
  args.shared = '/shared'
  row = module.run_cell('sst2_1pct', 'finetune', args)
  cmd, workdir = ran[0]
  assert cmd[-2:] == ['--config.optim.lr=3e-4', '--config.init.workdir=/tmp/pre']
  assert workdir == os.path.join(str(tmp_path), 'sst2_1pct+lr3e-4_finetune')
  assert row['cell'] == 'sst2_1pct+lr3e-4'
  plain = dict(row, cell='sst2_1pct', value=0.5)
  table = module.report([plain, row])
  assert '| sst2_1pct | eval/accuracy | 105 | not run | 50.0% |' in table
  assert '| sst2_1pct+lr3e-4 | eval/accuracy | 105 | not run | 60.0% |' in table
