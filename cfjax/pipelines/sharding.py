"""Data-parallel generation: the batch axis sharded over a ``jax.sharding.Mesh``.

The same code runs on one CPU, on 8 forced host devices in the tests
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on every local GPU. Parameters are
replicated, queries are split along the batch axis with ``NamedSharding(mesh, P("batch"))``,
and ``jit`` partitions the computation; results equal the single-device ones.

Multi-host (a GPU/TPU pod): every process calls ``jax.distributed.initialize()`` (the explain
commands do with ``--distributed``), computes its own shards of a shard directory (process p of
P takes shards k with k % P == p, see cfjax.pipelines.shards) and shards each batch over its
own ``jax.local_devices()`` as here; no array crosses hosts. Tested with two processes on one
machine (tests/test_distributed.py: CPU, gloo collectives, a loopback ``--coordinator-address``);
not on a real pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfjax.errors import CfjaxError
from cfjax.parallel import BATCH_AXIS
from cfjax.validation import non_negative_int

def batch_mesh(devices: int | None = None) -> Mesh | None:
    """A 1-D mesh over ``devices`` local devices (None or 0: all of them); None for one device."""
    local = jax.local_devices()
    n = len(local) if not devices else non_negative_int(devices, "devices")
    if n > len(local):
        raise CfjaxError(f"--devices {n}: only {len(local)} local device(s) available ({local[0].platform})")
    if n == 1:
        return None
    return Mesh(np.array(local[:n]), (BATCH_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def round_batch(batch_size: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the device count that is >= batch_size."""
    n = mesh_size(mesh)
    return -(-batch_size // n) * n


def shard_batch(x, mesh: Mesh | None):
    """Split the leading axis over the mesh (a plain device array on one device)."""
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))


def replicate(tree, mesh: Mesh | None):
    """Copy a pytree (parameters) to every device of the mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
