"""ActNorm: per-channel affine map ``y = x * exp(log_scale) + bias`` with data-dependent init.

Parameters: ``{"log_scale": (C,), "bias": (C,)}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-6


def init(x: jax.Array) -> dict:
    """x (B, H, W, C) -> params making the output zero-mean, unit-std per channel over (B, H, W)."""
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    std = jnp.std(x, axis=(0, 1, 2))
    log_scale = -jnp.log(std + _EPS)
    return {"log_scale": log_scale, "bias": -mean * jnp.exp(log_scale)}


def _logdet(params: dict, x: jax.Array) -> jax.Array:
    hw = x.shape[1] * x.shape[2]
    return jnp.full((x.shape[0],), hw * jnp.sum(params["log_scale"]), dtype=x.dtype)


def forward(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (y (B, H, W, C), logdet (B,))."""
    y = x * jnp.exp(params["log_scale"]) + params["bias"]
    return y, _logdet(params, x)


def inverse(params: dict, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """y (B, H, W, C) -> (x (B, H, W, C), logdet of the inverse map (B,))."""
    x = (y - params["bias"]) * jnp.exp(-params["log_scale"])
    return x, -_logdet(params, y)
