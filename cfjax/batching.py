"""The one chunked-batch helper: run a function over N examples in chunks of a fixed size.

    map_chunks(fn, (x, t), 256)          fn(x_chunk, t_chunk) -> arrays with a leading chunk axis

Every chunked loop of cfjax (the explain drivers, model predictions, metrics) goes through
:func:`map_chunks`, so padding the last chunk (one compiled shape), trimming it and
concatenating the results are written once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.errors import CfjaxError
from cfjax.validation import positive_int


def pad_rows(a, size: int):
    """``a`` (m, ...) with its last row repeated up to ``size`` rows (NumPy or JAX arrays, typed
    PRNG keys included); returned unchanged when m >= size."""
    m = a.shape[0]
    if m >= size:
        return a
    if isinstance(a, jax.Array):
        return jnp.concatenate([a, jnp.repeat(a[-1:], size - m, 0)])
    return np.concatenate([a, np.repeat(a[-1:], size - m, 0)])


def map_chunks(fn: Callable, arrays: Sequence, batch_size: int, *, pad: bool = True, axis1: Sequence[str] = (),
               on_chunk: Callable[[int, int], None] | None = None):
    """``fn(*chunks)`` over ``arrays`` (each (N, ...), same N) in chunks of ``batch_size`` rows.

    ``pad``: the last chunk is padded to ``batch_size`` rows by repeating its last row (one
    compiled shape) and the padding is cut from the results. ``fn`` returns a pytree of arrays
    whose leading axis is the chunk's; for a dict result, the keys in ``axis1`` carry the chunk on
    axis 1 instead (e.g. a per-stage trajectory (S, B, ...)). ``on_chunk(done, m)`` is called
    after each chunk of m rows, ``done`` rows in all. Returns the concatenated NumPy pytree.
    """
    n = arrays[0].shape[0]
    if n == 0:
        raise CfjaxError("cannot apply a model to an empty batch")
    if any(a.shape[0] != n for a in arrays):
        raise CfjaxError(f"map_chunks needs arrays of one length, got {[a.shape[0] for a in arrays]}")
    batch_size = positive_int(batch_size, "batch_size")

    def rows(key, a, m):
        a = np.asarray(a)
        return a[:, :m] if key in axis1 else a[:m]

    outs = []
    for i in range(0, n, batch_size):
        chunk = [a[i : i + batch_size] for a in arrays]
        m = chunk[0].shape[0]
        if pad:
            chunk = [pad_rows(a, batch_size) for a in chunk]
        out = fn(*chunk)
        if isinstance(out, dict):
            outs.append({k: rows(k, v, m) for k, v in out.items()})
        else:
            outs.append(jax.tree_util.tree_map(lambda a, m=m: np.asarray(a)[:m], out))
        if on_chunk is not None:
            on_chunk(i + m, m)
    if isinstance(outs[0], dict):
        return {k: np.concatenate([o[k] for o in outs], axis=1 if k in axis1 else 0) for k in outs[0]}
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)
