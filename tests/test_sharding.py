import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import pytest

from lm import sharding
from lm.config import ConfigError


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp, 'tensor': tensor})


def test_mesh_fill_resolves_minus_one():
  assert sharding.mesh_shape(_mesh_cfg(-1, 4, 1), 8) == (2, 4, 1)
  assert sharding.mesh_shape(_mesh_cfg(1, -1, 2), 8) == (1, 4, 2)


@pytest.mark.parametrize('cfg,devices,needle', [
    ((2, 2, 1), 8, 'product is 8'),
    ((-1, 3, 1), 8, 'not divisible by 3'),
    ((-1, -1, 1), 8, 'more than one -1'),
    ((0, 1, 1), 8, 'size < 1'),
])
def test_mesh_errors_name_the_fix(cfg, devices, needle):
  with pytest.raises(ConfigError, match=needle):
    sharding.mesh_shape(_mesh_cfg(*cfg), devices)


def test_make_mesh_uses_all_devices_with_auto_axes():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 4, 2))
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 4, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_fit_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(_mesh_cfg(-1, 4, 2))
  assert sharding._fit(P('tensor', 'fsdp'), (65, 128), mesh) == P(None, 'fsdp')
  assert sharding._fit(P(('data', 'fsdp'), None), (12, 3), mesh) == P(('data', 'fsdp'), None)
  assert sharding._fit(P('fsdp', 'tensor'), (8,), mesh) == P()  # rank mismatch: replicate
