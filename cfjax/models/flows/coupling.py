"""Affine coupling with a soft-clamped log-scale.

Channels split as ``x_a = x[..., :C//2]`` (passed through) and ``x_b = x[..., C//2:]``;
``(shift, raw) = subnet(x_a)``, ``s = clamp * (2/pi) * atan(raw / clamp)``,
``y_b = x_b * exp(s) + shift``, ``logdet = sum(s)`` over (H, W, C_b).

Subnet: conv3x3 (C_a -> hidden) - ReLU - conv1x1 (hidden -> hidden) - ReLU - conv3x3 (hidden -> 2 C_b),
last conv zero-initialised so the block starts as the identity. Parameters::

    {"conv1": {"w": (3, 3, C_a, hid), "b": (hid,)},
     "conv2": {"w": (1, 1, hid, hid), "b": (hid,)},
     "conv3": {"w": (3, 3, hid, 2 C_b), "b": (2 C_b,)}}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.models.flows.conv1x1 import key_rng

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(p: dict, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=_DN)
    return y + p["b"]


def _he(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
    fan_in = shape[0] * shape[1] * shape[2]
    return jnp.asarray(rng.standard_normal(shape) * math.sqrt(2.0 / fan_in), jnp.float32)


def init(key: jax.Array | np.ndarray, channels: int, hidden: int) -> dict:
    """Params for a coupling on ``channels`` channels with subnet width ``hidden`` (He-normal
    hidden convs, drawn host-side from a generator seeded by the concrete ``key``; zero last conv)."""
    c_a = channels // 2
    c_b = channels - c_a
    rng = key_rng(key)
    return {
        "conv1": {"w": _he(rng, (3, 3, c_a, hidden)), "b": jnp.zeros((hidden,), jnp.float32)},
        "conv2": {"w": _he(rng, (1, 1, hidden, hidden)), "b": jnp.zeros((hidden,), jnp.float32)},
        "conv3": {"w": jnp.zeros((3, 3, hidden, 2 * c_b), jnp.float32), "b": jnp.zeros((2 * c_b,), jnp.float32)},
    }


def _shift_scale(params: dict, x_a: jax.Array, clamp: float) -> tuple[jax.Array, jax.Array]:
    h = jax.nn.relu(_conv(params["conv1"], x_a))
    h = jax.nn.relu(_conv(params["conv2"], h))
    out = _conv(params["conv3"], h)
    c_b = out.shape[-1] // 2
    shift, raw = out[..., :c_b], out[..., c_b:]
    s = clamp * (2.0 / math.pi) * jnp.arctan(raw / clamp)
    return shift, s


def forward(params: dict, x: jax.Array, clamp: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) -> (y (B, H, W, C), logdet (B,))."""
    c_a = x.shape[-1] // 2
    x_a, x_b = x[..., :c_a], x[..., c_a:]
    shift, s = _shift_scale(params, x_a, clamp)
    y_b = x_b * jnp.exp(s) + shift
    return jnp.concatenate([x_a, y_b], axis=-1), jnp.sum(s, axis=(1, 2, 3))


def inverse(params: dict, y: jax.Array, clamp: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """y (B, H, W, C) -> (x (B, H, W, C), logdet of the inverse map (B,))."""
    c_a = y.shape[-1] // 2
    y_a, y_b = y[..., :c_a], y[..., c_a:]
    shift, s = _shift_scale(params, y_a, clamp)
    x_b = (y_b - shift) * jnp.exp(-s)
    return jnp.concatenate([y_a, x_b], axis=-1), -jnp.sum(s, axis=(1, 2, 3))
