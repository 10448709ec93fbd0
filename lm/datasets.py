"""Opening datasets on disk: prepared TFDS datasets (never downloaded) and split files.

Every loader (text corpora, images, labelled text) goes through these checks, so a missing
data dir, an unprepared dataset, a missing split or feature reads the same everywhere.
"""

import glob
import os
import re

from lm.config import ConfigError


def _tfds():
  # Imported on first use: runs on files: corpora or split files never load TFDS.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def prepare_hint(name: str = '<name>') -> str:
  return (f'to create it, run python -m lm.prepare {name} --data_dir=<dir> (add '
          '--source=<file> when offline) and pass --config.data.data_dir=<dir>')


def data_dir(path: str) -> str:
  """`path` (or TFDS's default dir when empty), which must exist."""
  resolved = os.path.expanduser(path or _tfds().core.constants.DATA_DIR)
  if not os.path.isdir(resolved):
    raise ConfigError(f'data dir {resolved!r} does not exist; {prepare_hint()}')
  return resolved


def prepared(path: str) -> list[str]:
  """Names of the datasets prepared in a TFDS data dir."""
  # A prepared dataset has <name>/<version>/dataset_info.json, or <name>/<config>/<version>/.
  infos = (glob.glob(os.path.join(path, '*', '*', 'dataset_info.json')) +
           glob.glob(os.path.join(path, '*', '*', '*', 'dataset_info.json')))
  return sorted({os.path.relpath(p, path).split(os.sep)[0] for p in infos})


def tfds_info(name: str, path: str):
  """The metadata (tfds.core.DatasetInfo, from dataset_info.json) of dataset `name` prepared in
  data dir `path`, or None when it is not there; reads no example and raises nothing."""
  resolved = os.path.expanduser(path or tfds.core.constants.DATA_DIR)
  if not os.path.isdir(resolved) or name.split(':')[0].split('/')[0] not in prepared(resolved):
    return None
  try:
    builder = tfds.builder(name, data_dir=resolved)
  except Exception:  # pylint: disable=broad-except  An unknown name or version: no metadata.
    return None
  return builder.info if builder.is_prepared() else None


def tfds_builder(name: str, path: str, features: dict[str, str] | None = None):
  """The builder of dataset `name` already prepared in data dir `path`.

  `features` maps each feature the caller needs to the config field that names it ('' when
  no field does: the dataset is then the wrong kind).
  """
  path = data_dir(path)
  base_name = name.split(':')[0].split('/')[0]
  have = prepared(path)
  if base_name not in have:
    raise ConfigError(
        f'TFDS dataset {name!r} is not prepared in {path!r} (it has: {", ".join(have) or "nothing"}'
        f'); point --config.data.data_dir at a dir that has it, or {prepare_hint(base_name)}')
  try:
    builder = _tfds().builder(name, data_dir=path)
  except Exception as e:  # pylint: disable=broad-except  TFDS raises many kinds here.
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ConfigError(f'cannot open TFDS dataset {name!r} in {path!r} ({reason}); fix '
                      '--config.data.name') from e
  if not builder.is_prepared():
    raise ConfigError(f'TFDS dataset {name!r} (version {builder.version}) is not prepared in '
                      f'{path!r}; name a version that is, or {prepare_hint(base_name)}')
  for feature, field in (features or {}).items():
    if feature not in builder.info.features:
      fix = (f'set --config.data.{field} to one of them' if field else
             'pick a dataset of the kind this task reads')
      raise ConfigError(f'TFDS dataset {name!r} has no feature {feature!r}; it has '
                        f'{", ".join(builder.info.features)}: {fix}')
  return builder


def tfds_source(builder, split: str, field: str, **kwargs):
  """`builder.as_data_source(split)` after checking the split exists ('train[:10%]' allowed);
  `field` names the config field that chose it, for the error message."""
  splits = list(builder.info.splits.keys())
  if re.match(r'[^\[]*', split).group(0) not in splits:
    raise ConfigError(f'TFDS dataset {builder.name!r} has no split {split!r}; it has '
                      f'{", ".join(splits)}: set --config.data.{field} to one of them')
  try:
    return builder.as_data_source(split=split, **kwargs)
  except ValueError as e:  # A slice that selects no example.
    raise ConfigError(f'TFDS split {split!r} of {builder.name!r} selects nothing ({e}); fix '
                      f'--config.data.{field}') from e


def split_file(directory: str, split: str, extensions: tuple[str, ...]) -> str:
  """`<directory>/<split><ext>` for the first extension that exists."""
  path = data_dir(directory) if directory else None
  if path is None:
    raise ConfigError("data.name='' reads split files from data.data_dir, which is empty; pass "
                      '--config.data.data_dir=<dir with ' +
                      ', '.join(f'<split>{e}' for e in extensions) + '>')
  for ext in extensions:
    candidate = os.path.join(path, split + ext)
    if os.path.isfile(candidate):
      return candidate
  have = sorted(f for f in os.listdir(path) if f.endswith(extensions))
  raise ConfigError(f'no {" or ".join(split + e for e in extensions)} in {path!r} (it has: '
                    f'{", ".join(have) or "no split files"}); fix --config.data.data_dir or the '
                    'split name')
