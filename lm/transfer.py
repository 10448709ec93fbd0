"""Starting a run from another run's weights: fine-tuning, linear probes, pretrained towers.

`config.init.workdir` names the source: a run directory (its latest checkpoint, or
`init.step`), or 'prefix=dir,...' to load several runs into parts of this model (a CIFAR CNN
into `image_tower/`, a language model into `text_tower/`). Only weights move: the parameters
(the source's EMA when it kept one: what it evaluated) and non-trainable collections such as
BatchNorm statistics; never its optimizer state or step.

The match is by path and strict. Every source leaf must land on a leaf of this model with the
same shape, unless `init.skip` names it; this model's leaves the source lacks are new (a
classification head) and keep their initialisation. One exception to equal shapes: an
embedding table this model extends with rows (the [PAD] and [CLS] ids a classifier appends
after the tokenizer's) takes the source's rows and keeps its new ones. Before training, the
run prints what was loaded, what is new and what was skipped.
"""

import json
import os
import re

import jax

from lm import checkpoint
from lm.checkpoint import ocp  # Imports orbax at first use.
from lm.config import ConfigError

# Fields of config.model a text trunk shares with the run it starts from.
# scan_layers too: it decides the parameter paths (block_<i>/... or stacked blocks/...).
_TRUNK_FIELDS = ('num_layers', 'num_heads', 'd_model', 'mlp_dim', 'seq_len', 'pos', 'norm',
                 'mlp', 'use_bias', 'scan_layers')
_IMAGE_FIELDS = ('name', 'width')
# How a text run turned text into ids (its tokenizer.json itself is reused: source_tokenizer).
_TOKENIZER_FIELDS = ('tokenizer',)


def sources(init_cfg) -> list[tuple[str, str]]:
  """(prefix, workdir) pairs of init.workdir; prefix '' loads into the whole model."""
  out = []
  for item in filter(None, (x.strip() for x in init_cfg.workdir.split(','))):
    prefix, sep, path = item.partition('=')
    prefix, path = (prefix.strip('/'), path) if sep else ('', item)
    if not os.path.isdir(path):
      raise ConfigError(f'init.workdir {path!r} does not exist; point --config.init.workdir at a '
                        'finished run')
    if checkpoint.latest_step(path) is None:
      raise ConfigError(f'init.workdir {path!r} has no checkpoint; train there first')
    out.append((prefix, path))
  return out


def _source_config(workdir: str) -> dict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'init.workdir {workdir!r} has no config.json; it is not a run directory')
  with open(path) as f:
    return json.load(f)


def adopt(config) -> list[str]:
  """Takes the source run's model hyperparameters where this model shares its trunk (a text
  trunk from an LM or text classifier, with its tokenizer settings; an image model from an
  image classifier), so the weights fit. Returns one line per field it changed."""
  notes = []
  for prefix, workdir in sources(config.init):
    if prefix:
      continue  # A tower's own fields are the tower's experiment's to set.
    source = _source_config(workdir)
    text = {'lm', 'classify_text'}
    if config.task in text and source['task'] in text:
      fields = _TRUNK_FIELDS
    elif config.task == source['task'] == 'classify':
      fields = _IMAGE_FIELDS
    else:
      continue
    adopted = [('model', f) for f in fields]
    if fields is _TRUNK_FIELDS:
      adopted += [('data', f) for f in _TOKENIZER_FIELDS]
    for section, field in adopted:
      if field not in source[section]:
        continue  # A run from before the field: it had the default.
      value = source[section][field]
      if config[section][field] != value:
        notes.append(f'init: {section}.{field}={value!r} from {workdir} (the config said '
                     f'{config[section][field]!r})')
        config[section][field] = value
  return notes


def source_tokenizer(config):
  """The tokenizer of the source run a text model starts from (None if it has none).

  Token ids must mean what they meant in pretraining, so the source's tokenizer is reused;
  a config asking for another kind is an error rather than a silently scrambled embedding.
  """
  from lm import data  # pylint: disable=g-import-not-at-top
  for _, workdir in sources(config.init):
    if os.path.exists(os.path.join(workdir, 'tokenizer.json')):
      tokenizer = data.load_tokenizer(workdir)
      kind = tokenizer.to_json()['kind']
      if kind != config.data.tokenizer:
        raise ConfigError(f'init.workdir {workdir!r} used the {kind} tokenizer but '
                          f'data.tokenizer={config.data.tokenizer!r}; set '
                          f'--config.data.tokenizer={kind}: its tokenizer is reused')
      return tokenizer
  return None


def _flat(tree, prefix: str = '') -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  return {prefix + jax.tree_util.keystr(p, simple=True, separator='/'): x for p, x in leaves}


def _with_prefix(path: str, prefix: str) -> str:
  """'params/Conv_0/kernel' -> 'params/<prefix>/Conv_0/kernel'."""
  if not prefix:
    return path
  collection, rest = path.split('/', 1)
  return f'{collection}/{prefix}/{rest}'


def _extends_rows(source_shape, target_shape, path: str) -> bool:
  return (path.endswith('embedding') and len(source_shape) == len(target_shape) == 2 and
          source_shape[1] == target_shape[1] and source_shape[0] < target_shape[0])


def load(state, abstract_state, init_cfg, is_main: bool = True):
  """`state` with the source runs' weights in place of its fresh ones; prints the report."""
  skip = [re.compile(p.strip()) for p in init_cfg.skip.split(',') if p.strip()]
  target = {**_flat(abstract_state.params, 'params/'),
            **_flat(abstract_state.model_state, '')}
  values = {**_flat(state.params, 'params/'), **_flat(state.model_state, '')}
  loaded, skipped = {}, []
  for prefix, workdir in sources(init_cfg):
    # A partial restore (the weights only) needs the PyTree handler.
    mngr = checkpoint.reader(workdir, handler=ocp.PyTreeCheckpointHandler())
    try:
      step = init_cfg.step or mngr.latest_step()
      if step not in mngr.all_steps():
        raise ConfigError(f'init.step={step} is not a checkpoint of {workdir} (it has '
                          f'{mngr.all_steps()}); fix --config.init.step')
      meta, weights = checkpoint.saved_weights(mngr, step)
      source = {**_flat(meta[weights], 'params/'), **_flat(meta.get('model_state') or {}, '')}
      item, plan = {}, {}
      for path, m in source.items():
        here = _with_prefix(path, prefix)
        if any(p.search(path) or p.search(here) for p in skip):
          skipped.append(f'{workdir}:{path}')
          continue
        if here not in target:
          raise ConfigError(
              f"init: {workdir}'s {path} has no place in this model (nothing at {here}); "
              'name it in --config.init.skip to leave it out')
        want = target[here]
        if tuple(m.shape) != tuple(want.shape) and not _extends_rows(m.shape, want.shape, here):
          raise ConfigError(
              f'init: {path} is {tuple(m.shape)} in {workdir} but {here} is '
              f'{tuple(want.shape)} here; make the model match the source (its config.json) '
              'or name it in --config.init.skip')
        sharding = (want.sharding if tuple(m.shape) == tuple(want.shape) else
                    jax.sharding.NamedSharding(want.sharding.mesh,
                                               jax.sharding.PartitionSpec()))
        collection, rest = (weights, path.split('/', 1)[1]) if path.startswith('params/') else (
            'model_state', path)
        node = item.setdefault(collection, {})
        parts = rest.split('/')
        for part in parts[:-1]:
          node = node.setdefault(part, {})
        node[parts[-1]] = jax.ShapeDtypeStruct(tuple(m.shape), want.dtype, sharding=sharding)
        plan[here] = (collection, parts)
      restored = checkpoint.restore_part(mngr, step, item)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  orbax/tensorstore raise many kinds.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise ConfigError(f'init: cannot read the weights of {workdir} ({reason})') from e
    finally:
      mngr.close()
    for here, (collection, parts) in plan.items():
      value = restored[collection]
      for part in parts:
        value = value[part]
      if value.shape != values[here].shape:  # Extra embedding rows keep their init.
        value = _extend(values[here], value)
      values[here] = value
      loaded[here] = f'{workdir}@{step}'
  if not loaded:
    raise ConfigError(f'init: nothing of {init_cfg.workdir} fits this model; check '
                      '--config.init.workdir and --config.init.skip')
  new = [p for p in target if p not in loaded]
  if is_main:
    _report(loaded, new, skipped)
  params = _unflat(state.params, values, 'params/')
  model_state = _unflat(state.model_state, values, '')
  ema = params if state.ema_params is not None else None
  return state.replace(params=params, model_state=model_state, ema_params=ema)


def _extend(init, rows):
  """init with its first rows replaced by `rows`, in init's sharding."""
  return jax.jit(lambda a, b: a.at[:b.shape[0]].set(b.astype(a.dtype)),
                 out_shardings=init.sharding)(init, rows)


def _unflat(tree, values: dict, prefix: str):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(treedef, [
      values[prefix + jax.tree_util.keystr(p, simple=True, separator='/')] for p, _ in leaves])


def _report(loaded: dict, new: list[str], skipped: list[str]) -> None:
  def short(paths):
    paths = list(paths)
    return ', '.join(paths) if len(paths) <= 6 else f'{", ".join(paths[:5])}, ... ({len(paths)})'
  by_source = {}
  for path, src in loaded.items():
    by_source.setdefault(src, []).append(path)
  for src, paths in by_source.items():
    print(f'init: loaded {len(paths)} arrays from {src}: {short(paths)}', flush=True)
  print(f'init: new (initialised here): {short(new) or "nothing"}', flush=True)
  if skipped:
    print(f'init: skipped (init.skip): {short(skipped)}', flush=True)
