"""Per-example maps over a batch that may be sharded over a device mesh.

    f = per_example(fn, in_axes, mesh)      # vmap(fn, in_axes), each device mapping its own slice

A function vmapped over examples whose *parameters* are per example (DISC's generator priors:
every query has its own network) becomes a grouped convolution, with one feature group per
example. Left to ``jit``'s automatic (GSPMD) partitioning, such a convolution sharded along the
batch can be split wrongly by XLA (seen on XLA:CPU, jax 0.10: "output feature dimension ...
divisible by feature_group_count" in the weight gradient). The examples are independent, so
there is nothing to partition: :func:`per_example` runs the vmapped function under
``jax.shard_map``, every device on its own slice of the batch, with the shared arguments
replicated. On one device (``mesh`` None) it is plain ``jax.vmap``.

:func:`batch_mesh_of` recovers the mesh from an array's placement, so code that receives a batch
already sharded by the caller (``cfjax.pipelines.sharding.shard_batch``) needs no extra argument.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh_of(x) -> Mesh | None:
    """The mesh of ``x`` when it is sharded along its leading axis only, over every device of a
    one-axis mesh of more than one device; else None (one device, replicated, or another layout)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    mesh, spec = sharding.mesh, tuple(sharding.spec)
    if mesh.size < 2 or len(mesh.axis_names) != 1 or not spec or spec[0] != mesh.axis_names[0]:
        return None
    if any(s is not None for s in spec[1:]) or not isinstance(mesh, Mesh):
        return None
    return mesh


def per_slice(fn: Callable, batched: Any, mesh: Mesh | None) -> Callable:
    """``fn`` (already batched: it maps a batch to a batch), run by every device of a one-axis
    ``mesh`` on its own slice of the batch under ``jax.shard_map``; ``fn`` itself for ``mesh``
    None. ``batched`` mirrors fn's positional arguments: True for one split along its leading
    axis, False for one replicated (a pytree of flags is allowed for a pytree argument). Every
    output is split along its leading axis. For a fn whose examples are independent, the results
    equal fn's on each slice and the compiled program has no cross-device communication (jit's
    automatic partitioning of the same fn may insert collectives, e.g. for a concatenation along
    the batch axis)."""
    if mesh is None:
        return fn
    (axis,) = mesh.axis_names
    in_specs = jax.tree.map(lambda b: PartitionSpec(axis) if b else PartitionSpec(), tuple(batched))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(axis), check_vma=False)


def per_example(fn: Callable, in_axes: Any, mesh: Mesh | None) -> Callable:
    """``jax.vmap(fn, in_axes)``; with a one-axis ``mesh``, under ``jax.shard_map``: arguments
    mapped on axis 0 are split along the mesh axis, unmapped ones (``None``) replicated, and every
    output is split along its leading (example) axis. The mapped batch must divide evenly over
    the mesh. Results equal the one-device vmap on each slice."""
    mapped = jax.vmap(fn, in_axes=in_axes)
    if mesh is None:
        return mapped
    if in_axes == 0 or in_axes is None:  # one spec for every argument
        (axis,) = mesh.axis_names
        spec = PartitionSpec(axis) if in_axes == 0 else PartitionSpec()
        return jax.shard_map(mapped, mesh=mesh, in_specs=spec, out_specs=PartitionSpec(axis), check_vma=False)
    batched = jax.tree.map(lambda a: a is not None, in_axes, is_leaf=lambda a: a is None)
    return per_slice(mapped, tuple(batched), mesh)
