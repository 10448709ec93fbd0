"""benchmarks/compression.py: every family's flags name real config fields, and the table has a
column per metric (the text family reports spam F1, accuracy and ROC AUC)."""

import os

import pytest

from lm import config as config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _override(config, flag: str) -> None:
  """`--config.a.b=v` onto the locked config, as lm.main would (an unknown field raises)."""
  key, value = flag.removeprefix('--config.').split('=', 1)
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  old = node[leaf]
  node[leaf] = (value == 'True') if isinstance(old, bool) else type(old)(value)


@pytest.mark.parametrize('family', ['lm', 'cnn', 'text'])
def test_every_family_flag_names_a_field_of_its_experiment(family, load_benchmark):
  fam = load_benchmark('compression').FAMILIES[family]
  for experiment, flags in ((fam['experiment'], fam['common'] + fam.get('nm', [])),
                            (fam['student_experiment'], fam['common'] + fam['student'])):
    config = config_lib.load(os.path.join(_ROOT, experiment))
    for flag in flags:
      _override(config, flag)
    config_lib.check_values(config)


def test_text_student_is_smaller_than_its_teacher(load_benchmark):
  fam = load_benchmark('compression').FAMILIES['text']
  teacher = config_lib.load(os.path.join(_ROOT, fam['experiment']))
  student = config_lib.load(os.path.join(_ROOT, fam['student_experiment']))
  for flag in fam['student']:
    _override(student, flag)
  assert student.model.num_layers < teacher.model.num_layers
  assert student.model.d_model < teacher.model.d_model
  # What distillation requires of the pair: the same tokenizer and classes.
  assert student.data.to_dict() == teacher.data.to_dict()
  assert student.model.num_classes == teacher.model.num_classes


def test_table_has_a_column_per_metric(load_benchmark):
  module = load_benchmark('compression')
  row = {'quantize_report': {'float32_weight_bytes': 4000}, 'bytes_on_disk': 1234,
         'nonzero_params': 500,
         'eval': {'test/f1': 0.91234, 'test/accuracy': 0.98765, 'test/roc_auc': 0.99,
                  'items_per_s': 1500.4}}
  lines = module.table({'rows': {'pruned 50%': row}},
                       module.FAMILIES['text']['metrics']).splitlines()
  assert lines[0] == ('| model | parameters (nonzero) | bytes on disk | test/f1 | test/accuracy '
                      '| test/roc_auc | eval items/s |')
  assert lines[1].count('---') == 7
  assert lines[2] == '| pruned 50% | 1,000 (500) | 1,234 | 0.9123 | 0.9877 | 0.9900 | 1,500 |'
