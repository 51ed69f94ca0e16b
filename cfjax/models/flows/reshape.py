"""Volume-preserving 2x downsampling: space-to-depth squeeze and the orthonormal Haar transform.

Both map (B, H, W, C) -> (B, H/2, W/2, 4C) and have log-determinant 0.

- ``squeeze``: output channel index ``(dy * 2 + dx) * C + c`` holds ``x[b, 2i+dy, 2j+dx, c]``.
- ``haar_forward``: with ``a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]``
  the output is ``concat([(a+b+c+d)/2, (a-b+c-d)/2, (a+b-c-d)/2, (a-b-c+d)/2], axis=-1)``
  (average channels first, then horizontal, vertical and diagonal details; each block has C channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError


def _check(x: jax.Array) -> None:
    if x.ndim != 4:
        raise CfjaxError(f"expected a (B, H, W, C) array, got shape {tuple(x.shape)}")
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise CfjaxError(f"cannot downsample by 2: height {x.shape[1]} and width {x.shape[2]} must be even")


def _zeros(x: jax.Array) -> jax.Array:
    return jnp.zeros((x.shape[0],), x.dtype)


def squeeze(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, 4C) space-to-depth."""
    _check(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze(y: jax.Array) -> jax.Array:
    """(B, H/2, W/2, 4C) -> (B, H, W, C), the inverse of :func:`squeeze`."""
    b, h, w, c4 = y.shape
    if c4 % 4:
        raise CfjaxError(f"unsqueeze needs a channel count divisible by 4, got {c4}")
    c = c4 // 4
    y = y.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, c)


def squeeze_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (y (B, H/2, W/2, 4C), logdet zeros (B,))."""
    return squeeze(x), _zeros(x)


def squeeze_inverse(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """y (B, H/2, W/2, 4C) -> (x (B, H, W, C), logdet zeros (B,))."""
    return unsqueeze(y), _zeros(y)


def haar_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (y (B, H/2, W/2, 4C), logdet zeros (B,)); orthonormal 2x2 Haar."""
    _check(x)
    a, b, c, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    y = jnp.concatenate(
        [(a + b + c + d) * 0.5, (a - b + c - d) * 0.5, (a + b - c - d) * 0.5, (a - b - c + d) * 0.5], axis=-1
    )
    return y, _zeros(x)


def haar_inverse(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """y (B, H/2, W/2, 4C) -> (x (B, H, W, C), logdet zeros (B,)); exact inverse of :func:`haar_forward`."""
    bsz, h, w, c4 = y.shape
    if c4 % 4:
        raise CfjaxError(f"haar_inverse needs a channel count divisible by 4, got {c4}")
    s, hd, vd, dd = jnp.split(y, 4, axis=-1)
    a = (s + hd + vd + dd) * 0.5
    b = (s - hd + vd - dd) * 0.5
    c = (s + hd - vd - dd) * 0.5
    d = (s - hd - vd + dd) * 0.5
    top = jnp.stack([a, b], axis=3)  # (B, h, w, 2, C): dx
    bot = jnp.stack([c, d], axis=3)
    x = jnp.stack([top, bot], axis=2)  # (B, h, 2, w, 2, C): dy, dx
    return x.reshape(bsz, 2 * h, 2 * w, c4 // 4), _zeros(y)
