"""The README's commands name real modules, experiments and config fields, run on a fresh clone
(no ../shared), and its parameter counts are the models'."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from lm import config as config_lib
from lm import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, 'README.md')) as f:
  README = f.read()


def _commands() -> list[str]:
  """Every `python -m ...` command: lines of sh blocks (joined at trailing backslashes) and
  table cells."""
  commands = []
  for block in re.findall(r'```sh\n(.*?)```', README, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      commands += [c.strip() for c in line.split('&&') if 'python -m ' in c]
  commands += re.findall(r'`(python -m [^`]+)`', README)
  return [re.sub(r'\s+#.*$', '', c) for c in commands]


COMMANDS = _commands()


def test_the_readme_has_the_commands_we_expect():
  modules = {re.match(r'python -m ([\w.]+)', c).group(1) for c in COMMANDS}
  assert {'lm.main', 'lm.sample', 'lm.plot', 'lm.tokenizer', 'launch.local', 'launch.slurm',
          'launch.tpu', 'launch.sweep', 'pytest'} <= modules
  assert len(COMMANDS) > 20


@pytest.mark.parametrize('command', COMMANDS)
def test_each_command_names_real_things_and_needs_no_shared_checkout(command):
  module = re.match(r'python -m ([\w.]+)', command).group(1)
  assert importlib.util.find_spec(module) is not None, module
  for path in re.findall(r'--config=(\S+\.py)', command):
    assert os.path.isfile(os.path.join(ROOT, path)), path
  base = config_lib.get_config()
  for field in re.findall(r'--(?:config\.|grid[ =])([\w.]+)=', command):
    node = base
    for part in field.split('.'):
      assert part in node, f'{field} is not a config field'
      node = node[part]
  # A fresh clone has no ../shared: data comes from lm.prepare into the default data dir.
  assert '../shared' not in command


def _gpt2_params(vocab_size: int) -> int:
  c = config_lib.load(os.path.join(ROOT, 'experiments', 'gpt2_small.py'))
  net = model.Transformer(model.TransformerConfig.from_config(c.model, vocab_size))
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                           train=False))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def test_gpt2_small_parameter_counts_are_the_models():
  assert f'{_gpt2_params(256) / 1e6:.1f}M with the byte vocab' in README
  assert f'{_gpt2_params(50_257) / 1e6:.0f}M parameters with GPT-2\'s 50,257-token vocab' in README
