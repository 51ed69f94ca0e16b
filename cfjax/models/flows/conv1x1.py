"""Invertible 1x1 convolution, LU-parametrised: ``W = P @ L @ (U + diag(sign * exp(log_abs_s)))``.

Parameters (all float32, so they survive generic pytree maps such as noise or weight decay):

- ``"perm"`` (C, C): a fixed permutation matrix; only ``argmax`` over its rows is used, so it is
  effectively constant (zero gradient, robust to small perturbations).
- ``"lower"`` (C, C): only the strictly lower triangle is used (unit diagonal implied).
- ``"upper"`` (C, C): only the strictly upper triangle is used.
- ``"sign"`` (C,): only its sign is used (constant, zero gradient).
- ``"log_abs_s"`` (C,): log of the absolute diagonal of U.

The channel map per pixel is ``y[..., i] = sum_j W[i, j] x[..., j]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.scipy.linalg import solve_triangular


def key_rng(key: jax.Array | np.ndarray) -> np.random.Generator:
    """A NumPy generator seeded deterministically by a JAX PRNG key (raw uint32 or typed key).

    Initialisers draw their random numbers host-side: eager ``jax.random`` compiles a kernel per
    shape, which dominates start-up time on CPU. Consequently ``init`` needs a concrete key.
    """
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng([int(v) for v in np.asarray(key, np.uint32).ravel()])


def init(key: jax.Array | np.ndarray, channels: int) -> dict:
    """A random rotation (QR of a Gaussian seeded by ``key``), stored in LU form."""
    c = int(channels)
    q, r = np.linalg.qr(key_rng(key).standard_normal((c, c)))
    q = q * np.sign(np.diag(r))[None, :]  # Haar-distributed orthogonal matrix
    p, l, u = scipy.linalg.lu(q)  # q = p @ l @ u
    s = np.diag(u)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {
        "perm": f32(p),
        "lower": f32(np.tril(l, -1)),
        "upper": f32(np.triu(u, 1)),
        "sign": f32(np.where(s < 0, -1.0, 1.0)),
        "log_abs_s": f32(np.log(np.abs(s))),
    }


def _factors(params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    c = params["log_abs_s"].shape[0]
    perm = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(params["perm"]), axis=1), c, dtype=jnp.float32)
    eye = jnp.eye(c, dtype=jnp.float32)
    lower = jnp.tril(params["lower"], -1) + eye
    sign = jnp.where(jax.lax.stop_gradient(params["sign"]) < 0, -1.0, 1.0).astype(jnp.float32)
    upper = jnp.triu(params["upper"], 1) + jnp.diag(sign * jnp.exp(params["log_abs_s"]))
    return perm, lower, upper


def weight(params: dict) -> jax.Array:
    """The (C, C) channel-mixing matrix W."""
    perm, lower, upper = _factors(params)
    return perm @ lower @ upper


def inverse_weight(params: dict) -> jax.Array:
    """W^{-1} = U^{-1} L^{-1} P^T via triangular solves, (C, C)."""
    perm, lower, upper = _factors(params)
    linv_pt = solve_triangular(lower, perm.T, lower=True, unit_diagonal=True)
    return solve_triangular(upper, linv_pt, lower=False)


def _logdet(params: dict, x: jax.Array) -> jax.Array:
    hw = x.shape[1] * x.shape[2]
    return jnp.full((x.shape[0],), hw * jnp.sum(params["log_abs_s"]), dtype=x.dtype)


def forward(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (y (B, H, W, C), logdet (B,))."""
    y = jnp.einsum("bhwj,ij->bhwi", x, weight(params))
    return y, _logdet(params, x)


def inverse(params: dict, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """y (B, H, W, C) -> (x (B, H, W, C), logdet of the inverse map (B,))."""
    x = jnp.einsum("bhwj,ij->bhwi", y, inverse_weight(params))
    return x, -_logdet(params, y)
