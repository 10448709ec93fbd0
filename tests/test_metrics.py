import json
import os
import subprocess
import sys


from lm import metrics
from lm import plot


def test_writer_appends_jsonl_and_tensorboard(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  writer.write(10, {'train/loss': 2.5, 'eval/data_dir': '/x'})
  writer.write(20, {'train/loss': 2.0})
  writer.close()
  rows = metrics.read(str(tmp_path))
  assert rows == [{'step': 10, 'train/loss': 2.5, 'eval/data_dir': '/x'},
                  {'step': 20, 'train/loss': 2.0}]
  assert os.listdir(tmp_path / 'tb')  # TensorBoard event file.


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.Writer(str(tmp_path), enabled=False)
  writer.write(1, {'train/loss': 1.0})
  writer.close()
  assert not os.listdir(tmp_path)


def test_peak_table_and_measured_cpu_peak():
  assert metrics.peak_flops_per_device() > 1e9  # This host's measured float32 matmul rate.
  assert dict(metrics.PEAK_FLOPS)['H100'] == 989e12


def test_plot_draws_several_workdirs(tmp_path):
  for name, scale in (('a', 1.0), ('b', 2.0)):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / 'metrics.jsonl', 'w') as f:
      for step in range(1, 6):
        f.write(json.dumps({'step': step, 'train/loss': scale / step}) + '\n')
      f.write(json.dumps({'step': 5, 'eval/loss': scale}) + '\n')
  out = plot.plot([str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'loss.png'))
  assert os.path.getsize(out) > 1000


def test_plot_cli_errors_on_missing_metrics(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'lm.plot', str(tmp_path)], capture_output=True,
                          text=True)
  assert result.returncode == 2 and 'no metrics.jsonl' in result.stderr
