"""Multi-scale Glow network as pure functions over an explicit parameter pytree.

Structure, for each level ``l = 0 .. num_levels-1``:

1. downsample by 2 (Haar or squeeze): (B, H, W, C) -> (B, H/2, W/2, 4C);
2. ``steps_per_level`` flow steps, each ``actnorm -> invertible 1x1 conv -> affine coupling``
   (the step parameters of a level are stacked on a leading axis; applied by an unrolled Python loop);
3. if ``split`` and ``l`` is not the last level, factor out the second half of the channels.

Latent ordering: ``z = concat([f_0, f_1, ..., f_{L-2}, h_final], axis=1)`` where ``f_l`` is the part
factored out after level ``l`` (only when ``split``) and ``h_final`` the output of the last level,
each flattened in C-order from (B, h, w, c). ``D = H * W * C``.

Parameters::

    {"level0": {"actnorm": {...}, "conv1x1": {...}, "coupling": {...}},   # leaves (steps, ...)
     "level1": ...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.errors import CfjaxError
from cfjax.models.flows import actnorm, conv1x1, coupling, reshape, split

_DOWNSAMPLE = ("haar", "squeeze")


@dataclass(frozen=True)
class GlowConfig:
    """Static, hashable configuration of the Glow network."""

    image_shape: tuple[int, int, int] = (28, 28, 1)  # (H, W, C)
    num_levels: int = 2  # each level = downsample, then steps_per_level flow steps
    steps_per_level: int = 8  # a flow step = actnorm -> invertible 1x1 conv -> affine coupling
    hidden_channels: int = 64  # subnet width at level 0; doubles per level, capped by max_hidden
    max_hidden_channels: int = 128
    coupling_clamp: float = 2.0
    downsample: str = "haar"  # "haar" | "squeeze"
    split: bool = False  # factor out half the channels after each level but the last

    def __post_init__(self):
        shape = self.image_shape
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError) as e:
            raise CfjaxError(f"GlowConfig.image_shape must be (H, W, C) integers, got {self.image_shape!r}") from e
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise CfjaxError(f"GlowConfig.image_shape must be three positive integers (H, W, C), got {shape}")
        object.__setattr__(self, "image_shape", shape)
        for name in ("num_levels", "steps_per_level", "hidden_channels", "max_hidden_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise CfjaxError(f"GlowConfig.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        clamp = self.coupling_clamp
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float, np.floating)) or not clamp > 0 or not math.isfinite(clamp):
            raise CfjaxError(f"GlowConfig.coupling_clamp must be a positive finite number, got {clamp!r}")
        object.__setattr__(self, "coupling_clamp", float(clamp))
        if self.downsample not in _DOWNSAMPLE:
            raise CfjaxError(f"GlowConfig.downsample must be one of {_DOWNSAMPLE}, got {self.downsample!r}")
        if not isinstance(self.split, (bool, np.bool_)):
            raise CfjaxError(f"GlowConfig.split must be a bool, got {self.split!r}")
        object.__setattr__(self, "split", bool(self.split))
        f = 2**self.num_levels
        h, w, _ = shape
        if h % f or w % f:
            raise CfjaxError(
                f"GlowConfig.image_shape {shape}: height and width must be divisible by 2**num_levels = {f} "
                f"(num_levels={self.num_levels})"
            )

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlowConfig":
        return config_from_dict(cls, d)

    @property
    def latent_dim(self) -> int:
        return int(math.prod(self.image_shape))

    def level_shapes(self) -> list[tuple[int, int, int]]:
        """(h, w, c) inside each level (after its downsample, before any split)."""
        h, w, c = self.image_shape
        out = []
        for lvl in range(self.num_levels):
            h, w, c = h // 2, w // 2, 4 * c
            out.append((h, w, c))
            if self.split and lvl < self.num_levels - 1:
                c = c // 2
        return out

    def hidden_at(self, level: int) -> int:
        return int(min(self.hidden_channels * 2**level, self.max_hidden_channels))


def config_from_dict(cls, d: dict):
    """A flow config dataclass from its JSON dict: unknown fields refused, image_shape a tuple."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise CfjaxError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    d = dict(d)
    if "image_shape" in d:
        d["image_shape"] = tuple(d["image_shape"])
    return cls(**d)


def _down(config: GlowConfig, x):
    return (reshape.haar_forward if config.downsample == "haar" else reshape.squeeze_forward)(x)


def _up(config: GlowConfig, y):
    return (reshape.haar_inverse if config.downsample == "haar" else reshape.squeeze_inverse)(y)


def _step_forward(p: dict, x: jax.Array, clamp: float):
    x, ld1 = actnorm.forward(p["actnorm"], x)
    x, ld2 = conv1x1.forward(p["conv1x1"], x)
    x, ld3 = coupling.forward(p["coupling"], x, clamp)
    return x, ld1 + ld2 + ld3


def _step_inverse(p: dict, y: jax.Array, clamp: float):
    y, ld3 = coupling.inverse(p["coupling"], y, clamp)
    y, ld2 = conv1x1.inverse(p["conv1x1"], y)
    y, ld1 = actnorm.inverse(p["actnorm"], y)
    return y, ld1 + ld2 + ld3


def _run_steps(body, x, stacked: dict, config: GlowConfig, reverse: bool):
    """Apply ``body(x, step_params) -> (x, logdet)`` over the stacked steps of one level.

    A Python loop over the (few) steps rather than ``lax.scan``: XLA:CPU runs the gradient of a
    convolution inside a while-loop far slower than unrolled (benchmarks/results/profile_loop_cpu.json).
    """
    n = config.steps_per_level
    order = range(n - 1, -1, -1) if reverse else range(n)
    logdet = jnp.zeros((x.shape[0],), jnp.float32)
    for i in order:
        x, ld = body(x, jax.tree_util.tree_map(lambda a: a[i], stacked))
        logdet = logdet + ld
    return x, logdet


def _check_input(config: GlowConfig, x: jax.Array, what: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != config.image_shape:
        raise CfjaxError(f"{what}: expected shape (B, {', '.join(map(str, config.image_shape))}), got {tuple(x.shape)}")


@partial(jax.jit, static_argnums=2)
def _init_step(p: dict, x: jax.Array, clamp: float):
    """Data-dependent ActNorm init of one step on the batch x (B, h, w, c); returns (params, output)."""
    p = dict(p, actnorm=actnorm.init(x))
    return p, _step_forward(p, x, clamp)[0]


@partial(jax.jit, static_argnums=(0, 1))
def _init_transition(config: GlowConfig, level: int, x: jax.Array) -> jax.Array:
    """Split after ``level - 1`` (when configured), then the downsample of ``level``."""
    if config.split and level > 0:
        x, _ = split.split_forward(x)
    return _down(config, x)[0]


def _sub_key(key: jax.Array, *ints: int) -> np.ndarray:
    """A host-side derived seed: the key's words followed by ``ints`` (uint32)."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.concatenate([np.asarray(key, np.uint32).ravel(), np.asarray(ints, np.uint32)])


def init_glow(key: jax.Array, config: GlowConfig, x_init: jax.Array) -> dict:
    """Initialise the parameters; ``x_init`` (B, H, W, C) drives the data-dependent ActNorm init.

    The batch is propagated through the layers so every ActNorm sees its own input statistics.
    Weights are drawn host-side from generators seeded by ``key`` (so ``key`` must be concrete); the
    per-step ActNorm init + propagation is jitted (compiled once per level).
    """
    x = jnp.asarray(x_init, jnp.float32)
    _check_input(config, x, "init_glow x_init")
    params = {}
    for lvl in range(config.num_levels):
        x = _init_transition(config, lvl, x)
        steps = []
        c = x.shape[-1]
        for i in range(config.steps_per_level):
            p = {
                "conv1x1": conv1x1.init(_sub_key(key, lvl, i, 0), c),
                "coupling": coupling.init(_sub_key(key, lvl, i, 1), c, config.hidden_at(lvl)),
            }
            p, x = _init_step(p, x, config.coupling_clamp)
            steps.append(jax.device_get(p))
        params[f"level{lvl}"] = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack(a)), *steps)
    return params


def glow_forward(params: dict, config: GlowConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) float32 -> (z (B, D) flattened latent, log|det dz/dx| (B,))."""
    _check_input(config, x, "glow_forward")
    x = x.astype(jnp.float32)
    clamp = config.coupling_clamp
    logdet = jnp.zeros((x.shape[0],), jnp.float32)
    parts = []

    def body(h, p):
        h, ld = _step_forward(p, h, clamp)
        return h, ld

    for lvl in range(config.num_levels):
        x, ld = _down(config, x)
        logdet = logdet + ld
        x, ld = _run_steps(body, x, params[f"level{lvl}"], config, reverse=False)
        logdet = logdet + ld
        if config.split and lvl < config.num_levels - 1:
            x, z_out = split.split_forward(x)
            parts.append(z_out.reshape(z_out.shape[0], -1))
    parts.append(x.reshape(x.shape[0], -1))
    return jnp.concatenate(parts, axis=1), logdet


def glow_inverse(params: dict, config: GlowConfig, z: jax.Array) -> jax.Array:
    """z (B, D) -> x (B, H, W, C); the exact inverse of :func:`glow_forward`."""
    if z.ndim != 2 or z.shape[1] != config.latent_dim:
        raise CfjaxError(f"glow_inverse: expected z of shape (B, {config.latent_dim}), got {tuple(z.shape)}")
    z = z.astype(jnp.float32)
    b = z.shape[0]
    clamp = config.coupling_clamp
    shapes = config.level_shapes()
    # Slice the latent into the factored-out parts and the final output (see module docstring).
    offset = 0
    outs = []
    if config.split:
        for lvl in range(config.num_levels - 1):
            h, w, c = shapes[lvl]
            c_out = c - c // 2
            n = h * w * c_out
            outs.append(z[:, offset : offset + n].reshape(b, h, w, c_out))
            offset += n
    h, w, c = shapes[-1]
    x = z[:, offset:].reshape(b, h, w, c)

    def body(h_, p):
        return _step_inverse(p, h_, clamp)

    for lvl in reversed(range(config.num_levels)):
        if config.split and lvl < config.num_levels - 1:
            x = split.split_inverse(x, outs[lvl])
        x, _ = _run_steps(body, x, params[f"level{lvl}"], config, reverse=True)
        x, _ = _up(config, x)
    return x


def num_params(params) -> int:
    """Total number of scalar entries in a parameter pytree."""
    return int(sum(int(np.prod(np.shape(l))) for l in jax.tree_util.tree_leaves(params)))
