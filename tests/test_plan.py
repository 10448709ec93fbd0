"""--dry_run's plan: checks that come before the compile, and a listing in reading order."""

import pytest

from lm import config as config_lib
from lm import plan
from lm.config import ConfigError


def test_an_unknown_plan_device_is_refused_before_anything_is_built(monkeypatch):
  # It used to come after building the trainer and compiling the step (15 s for GPT-2 small).
  monkeypatch.setattr(plan.train, 'Trainer',
                      lambda *args, **kwargs: pytest.fail('built a trainer first'))
  with pytest.raises(ConfigError, match="--plan_device='Z9' is not in the peak table"):
    plan.print_plan(config_lib.get_config(), 'Z9')


def test_parameters_are_listed_in_natural_order():
  paths = ['pos_embedding', 'block_10/mlp/wi', 'block_2/mlp/wi', 'block_1/attn/qkv',
           'block_1/attn/out', 'embedding']
  assert sorted(paths, key=plan._natural) == [  # pylint: disable=protected-access
      'block_1/attn/out', 'block_1/attn/qkv', 'block_2/mlp/wi', 'block_10/mlp/wi', 'embedding',
      'pos_embedding']
