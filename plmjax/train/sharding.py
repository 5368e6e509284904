"""Device mesh from config, logical-axis shardings, sharded init, global batches."""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh (-1 = "the rest") against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh has -1 on {len(free)} axes; at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not "
          f"divide the {num_devices} available devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available; set the sizes to multiply to {num_devices} "
        "(or one of them to -1)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def num_processes(mesh: Mesh) -> int:
  """Hosts the mesh spans (the current run's, or a TPU slice's for `plmjax compile`)."""
  return len({d.process_index for d in mesh.devices.flat})


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh):
  micro = batch_size // grad_accum_steps
  ways = batch_parallelism(mesh)
  if micro % ways:
    raise ConfigError(
        f"config.train.batch_size={batch_size} (micro-batch {micro} with grad_accum_steps="
        f"{grad_accum_steps}) is not divisible by the {ways} data-parallel devices "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of {ways}")
  hosts = num_processes(mesh)
  if batch_size % hosts:
    raise ConfigError(f"config.train.batch_size={batch_size} is not divisible by the "
                      f"{hosts} processes (hosts)")


def logical_shardings(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of nn.Partitioned (abstract) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from each process's rows (leading axis)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def bytes_per_device(tree) -> dict:
  """Bytes of `tree` held on each device (to check that FSDP really shards)."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
