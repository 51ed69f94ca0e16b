"""Multi-scale factor-out: keep the first half of the channels, pass the second half to the latent.

There is one class-conditional Gaussian over the whole latent, so no per-level prior here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (x_kept (B, H, W, C//2), z_out (B, H, W, C - C//2))."""
    c = x.shape[-1] // 2
    return x[..., :c], x[..., c:]


def split_inverse(x_kept: jax.Array, z_out: jax.Array) -> jax.Array:
    """(x_kept (B, H, W, C1), z_out (B, H, W, C2)) -> x (B, H, W, C1 + C2)."""
    return jnp.concatenate([x_kept, z_out], axis=-1)
