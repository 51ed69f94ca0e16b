"""cfjax.batching.map_chunks against one unchunked call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.batching import map_chunks, pad_rows
from cfjax.errors import CfjaxError


@pytest.mark.parametrize("pad", [True, False])
def test_chunks_equal_one_call_and_padding_keeps_one_shape(pad):
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 5, 10)
    shapes, seen = set(), []

    def fn(xb, tb):
        shapes.add(xb.shape)
        return {"s": xb.sum(1) + tb, "traj": np.stack([xb, 2 * xb])}  # traj: (2, B, 3)

    out = map_chunks(fn, (x, t), 4, pad=pad, axis1=("traj",), on_chunk=lambda done, m: seen.append((done, m)))
    np.testing.assert_allclose(out["s"], x.sum(1) + t, rtol=1e-6)
    np.testing.assert_allclose(out["traj"], np.stack([x, 2 * x]), rtol=1e-6)
    assert seen == [(4, 4), (8, 4), (10, 2)]
    assert shapes == ({(4, 3)} if pad else {(4, 3), (2, 3)})


def test_pytree_results_and_typed_keys():
    keys = jax.random.split(jax.random.key(0), 5)
    out = map_chunks(lambda k: (jax.random.uniform(k[0], ()) * jnp.ones(len(k)), jax.vmap(jax.random.key_data)(k)), (keys,), 2)
    np.testing.assert_array_equal(out[1], np.asarray(jax.vmap(jax.random.key_data)(keys)))
    assert out[0].shape == (5,)
    assert pad_rows(keys[:1], 3).shape == (3,)


def test_refusals():
    with pytest.raises(CfjaxError, match="empty"):
        map_chunks(lambda a: a, (np.zeros((0, 2)),), 4)
    with pytest.raises(CfjaxError, match="one length"):
        map_chunks(lambda a, b: a, (np.zeros(3), np.zeros(4)), 4)
    with pytest.raises(CfjaxError, match="batch_size"):
        map_chunks(lambda a: a, (np.zeros(3),), 0)
