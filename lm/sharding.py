"""The device mesh and the one table that maps logical axis names onto it.

Models name the axes of their parameters and activations ('embed', 'mlp', 'act_batch', ...);
`RULES` below is the only place that says which mesh axis each name is split over:
FSDP shards parameters and optimizer state over `fsdp`, Megatron-style tensor parallelism
splits heads, MLP and vocabulary over `tensor`, and the batch is split over `data` x `fsdp`.
"""

import math

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from lm.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

RULES = (
    # Activations.
    ('act_batch', BATCH_AXES),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # Parameters (and the optimizer state shaped like them).
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('layers', None),  # The stacked axis of model.scan_layers: each device holds every layer.
    ('norm', None),
    ('conv_in', None),
    ('conv_out', 'fsdp'),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one -1 in (data, fsdp, tensor) and checks the product is the device count."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} has more than one -1; '
                      'at most one axis may be -1 ("fill")')
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} has a size < 1; use positive sizes or -1')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f'mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: '
                        f'{num_devices} is not divisible by {fixed}')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f'mesh data*fsdp*tensor = {"*".join(map(str, sizes))} = {math.prod(sizes)} but there are '
        f'{num_devices} devices; set the sizes so their product is {num_devices} '
        '(or set one of them to -1)')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings propagate through the program as with classic pjit.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_shards(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 65-token vocab over tensor=2)."""
  if len(spec) > len(shape):
    return P()
  dims = []
  for axes, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if size % mesh.shape[a] == 0)
    size_left = size
    fitted = []
    for a in kept:
      if size_left % mesh.shape[a] == 0:
        fitted.append(a)
        size_left //= mesh.shape[a]
    dims.append(tuple(fitted) if len(fitted) > 1 else (fitted[0] if fitted else None))
  return P(*dims)


def logical_shardings(boxed_tree, abstract_tree, mesh: Mesh):
  """NamedShardings for a tree of flax LogicallyPartitioned boxes, fitted to the real shapes."""
  logical = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, RULES)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
      mesh_specs, abstract_tree, is_leaf=lambda s: isinstance(s, P))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
  """Optimizer state shaped like a parameter is sharded like it; the rest is replicated.

  A state leaf belongs to the parameter whose path ends its own (Adam's mu/block_0/attn/qkv
  is block_0/attn/qkv's), which holds whatever nests it: chains, masks, param groups.
  """
  def key(entry):
    return getattr(entry, 'key', getattr(entry, 'name', getattr(entry, 'idx', entry)))

  params = {}
  for (path, x), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                           jax.tree.leaves(param_shardings,
                                           is_leaf=lambda s: isinstance(s, NamedSharding))):
    params[tuple(key(k) for k in path)] = (tuple(x.shape), sh)

  def leaf_sharding(path, x):
    keys = tuple(key(k) for k in path)
    for start in range(len(keys)):
      shape, sh = params.get(keys[start:], (None, None))
      if sh is not None and shape == tuple(x.shape):
        return sh
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def describe(shardings_tree, abstract_tree) -> list[tuple[str, tuple, str]]:
  """(path, shape, partition spec) rows for the dry-run plan."""
  rows = []
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  specs = jax.tree.leaves(shardings_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, x), sharding in zip(flat, specs):
    rows.append((jax.tree_util.keystr(path, simple=True, separator='/'), tuple(x.shape),
                 str(tuple(sharding.spec))))
  return rows


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's slice of the batch into one globally sharded array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
