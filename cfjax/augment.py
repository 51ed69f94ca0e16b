"""Training-time geometric augmentation: small random rotations and scalings of each image.

(Integer shifts, which DISC's jitter uses too, are :func:`cfjax.methods.deep_inversion.random_shift`.)

Pure, jittable functions. Each image is warped about its centre by its own angle and scale and
resampled bilinearly with zero fill, so a digit stays a plausible digit of the same class: the
classical way to show a model trained on few MNIST digits more handwriting than it has.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from cfjax.errors import CfjaxError


def check_affine(max_rotate: float, max_scale: float) -> None:
    """``max_rotate`` in degrees, [0, 90); ``max_scale`` a fraction, [0, 1); CfjaxError otherwise."""
    if not 0.0 <= float(max_rotate) < 90.0:
        raise CfjaxError(f"augment_rotate must be in [0, 90) degrees, got {max_rotate!r}")
    if not 0.0 <= float(max_scale) < 1.0:
        raise CfjaxError(f"augment_scale must be in [0, 1), got {max_scale!r}")


def affine_params(key: jax.Array, batch: int, max_rotate: float, max_scale: float) -> tuple[jax.Array, jax.Array]:
    """Per-image angle (radians, uniform in +-max_rotate degrees) and scale (uniform in
    [1 - max_scale, 1 + max_scale]): two (batch,) arrays."""
    k_rot, k_scale = jax.random.split(key)
    r = math.radians(max_rotate)
    theta = jax.random.uniform(k_rot, (batch,), minval=-r, maxval=r)
    scale = jax.random.uniform(k_scale, (batch,), minval=1.0 - max_scale, maxval=1.0 + max_scale)
    return theta, scale


def affine_warp(x: jax.Array, theta: jax.Array, scale: jax.Array) -> jax.Array:
    """Rotate each image by ``theta[b]`` radians and scale it by ``scale[b]`` about its centre;
    bilinear, zero outside the image.

    x: (B, H, W, C); theta, scale: (B,) -> (B, H, W, C). Output pixel p samples the input at
    c + A^-1 (p - c), A = scale * rotation, c = ((H - 1) / 2, (W - 1) / 2).
    """
    _, h, w, _ = x.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = rows - cy, cols - cx

    def one(img, t, s):
        cos, sin = jnp.cos(t) / s, jnp.sin(t) / s
        # inverse of [[cos, -sin], [sin, cos]] * s acting on (row, col) offsets
        src_r = cy + cos * dy + sin * dx
        src_c = cx - sin * dy + cos * dx
        chan = lambda ch: map_coordinates(ch, [src_r, src_c], order=1, mode="constant", cval=0.0)
        return jax.vmap(chan, in_axes=-1, out_axes=-1)(img)

    return jax.vmap(one)(x, theta, scale)


def random_affine(key: jax.Array, x: jax.Array, max_rotate: float, max_scale: float) -> jax.Array:
    """:func:`affine_warp` with parameters drawn by :func:`affine_params`; x unchanged when both
    limits are 0. x: (B, H, W, C) -> (B, H, W, C)."""
    if max_rotate == 0 and max_scale == 0:
        return x
    theta, scale = affine_params(key, x.shape[0], max_rotate, max_scale)
    return affine_warp(x, theta, scale)
