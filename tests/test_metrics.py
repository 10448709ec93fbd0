import json
import os
import subprocess
import sys


from lm import metrics
from lm import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_plot_cli_writes_into_the_first_workdir_and_prints_where(tmp_path):
  """Not into the current directory, where a second plot would overwrite the first."""
  for name in ('a', 'b'):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.0}\n'
                                                   '{"step": 2, "train/loss": 1.0}\n')
  result = subprocess.run([sys.executable, '-m', 'lm.plot', str(tmp_path / 'a'),
                           str(tmp_path / 'b')], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(tmp_path / 'a' / 'loss.png')
  assert os.path.getsize(tmp_path / 'a' / 'loss.png') > 1000
  assert not (tmp_path / 'loss.png').exists()


# A row cut short by a kill or a full disk, then the next run's row glued onto it (what
# happened before Writer cut torn lines), then a line that parses but is not a row.
_TORN = ('{"step": 1, "train/loss": 3.0}\n'
         '{"step": 2, "train/lo{"step": 3, "train/loss": 2.0}\n'
         '[1, 2]\n'
         '{"step": 4, "train/loss": 1.5}\n'
         '{"step": 5, "eval/loss": 1.')


def test_reader_skips_lines_that_do_not_parse_with_one_warning_each(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(_TORN)
  rows = metrics.read(str(tmp_path))
  assert rows == [{'step': 1, 'train/loss': 3.0}, {'step': 4, 'train/loss': 1.5}]
  warnings = capsys.readouterr().err.strip().splitlines()
  assert [w.split(': skipping')[0] for w in warnings] == [
      f'warning: {path}:{n}' for n in (2, 3, 5)]
  assert metrics.read(str(tmp_path / 'nowhere')) == []


def test_writer_cuts_a_torn_last_line_before_appending(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  good = '{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.0}\n'
  path.write_text(good + '{"step": 3, "train/lo')
  writer = metrics.Writer(str(tmp_path))
  writer.write(3, {'train/loss': 1.0})
  writer.close()
  assert 'removed a last line cut short' in capsys.readouterr().err
  assert path.read_text() == good + '{"step": 3, "train/loss": 1.0}\n'
  assert metrics.read(str(tmp_path))[-1] == {'step': 3, 'train/loss': 1.0}
  assert capsys.readouterr().err == ''  # Nothing left to skip.

  # A whole file is left alone; a file that is one torn line is emptied.
  before = path.read_bytes()
  metrics.Writer(str(tmp_path)).close()
  assert path.read_bytes() == before
  path.write_text('{"st')
  metrics.Writer(str(tmp_path)).close()
  assert path.read_bytes() == b''


def test_plot_cli_draws_a_run_with_a_torn_line(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(_TORN)
  out = tmp_path / 'loss.png'
  result = subprocess.run([sys.executable, '-m', 'lm.plot', str(tmp_path), f'--out={out}'],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert os.path.getsize(out) > 1000
  assert f'{tmp_path}/metrics.jsonl:2: skipping' in result.stderr


def test_launchers_read_metrics_without_importing_jax():
  result = subprocess.run([sys.executable, '-c', 'import sys; from launch import _summary; '
                           'print("jax" in sys.modules)'], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.stdout.strip() == 'False', result.stderr
