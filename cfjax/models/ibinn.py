"""The IB-INN flow (Ardizzone et al., 2020; the network behind ECINN) as pure functions.

Structure for an image (H, W, C) with H, W divisible by 4 (MNIST: 28x28x1, D = 784)::

    Haar 2x2            (H, W, C)      -> (H/2, W/2, 4C)
    blocks_high x AIO   width width_high, no dropout
    downsampling coupling                -> (H/4, W/4, 16C)   strided + low-res subnets, width 2*width_high
    blocks_low  x AIO   width width_low, Dropout2d dropout_low
    DCT pooling         orthonormal 2-D DCT-II of each channel, flattened (h, w, c)   [dense=True]
    fixed permutation + one dense Glow coupling over all D dims                         [dense=True]

**All-in-one (AIO) block** on h (B, h, w, c), c1 = c - c//2 conditioning channels, c2 = c//2::

    a          = subnet(h[..., :c1])                       (B, h, w, 2 c2)
    s          = clamp * tanh(0.1 a[..., :c2]),  t = a[..., c2:]
    h2'        = h[..., c1:] * exp(s) + t
    out        = block_scale * (concat(h1, h2') @ Q^T)     Q: fixed random orthogonal (c, c)
    log|det|   = sum(s) + h w c log(block_scale)

Subnet (conv): [ReLU] conv3x3 (no bias) - BN - ReLU - conv3x3 (no bias) - BN - ReLU - [Dropout2d]
- conv1x1 (+bias); Kaiming-normal init, not zero (the tanh(0.1 .) clamp keeps the start near
identity). With ``batchnorm=False`` the BNs are replaced by biases.

**Downsampling coupling** on (B, h, w, c), c1 = c//2, c2 = c - c//2, ``sq`` = 2x2 squeeze::

    y2 = sq(x2) * exp(s_a) + t_a,   (s_a, t_a) from the strided subnet of x1 (stride-2 second conv)
    y1 = sq(x1) * exp(s_b) + t_b,   (s_b, t_b) from the low-res subnet of y2
    s  = clamp * tanh(0.2 raw);     out = concat(y1, y2)

**Dense Glow coupling** on v = perm(DCT(h)) (B, D), d1 = D//2::

    v1' = v1 * exp(s(r2)) + t(r2),  (r2) = fc_2(v2)
    v2' = v2 * exp(s(r1)) + t(r1),  (r1) = fc_1(v1')
    s   = dense_clamp * (2/pi) * atan(raw / dense_clamp)
    fc: Linear(d -> dense_width) - ReLU - Dropout(dense_dropout) - Linear(dense_width -> 2 d'),
        Kaiming-normal x 0.1 init

The fixed parts (orthogonal mixings, the dense permutation, the DCT) are functions of
``config.mixing_seed``, not parameters: nothing to train, nothing to checkpoint.

**Train/eval mode.** ``ibinn_forward(..., train=True, key=k)`` normalises each BN by its batch
statistics, applies dropout and returns updated running statistics
(``new = (1 - bn_momentum) old + bn_momentum batch``, PyTorch's convention; unbiased variance).
Eval mode (the default, and the only mode of :func:`ibinn_inverse`) uses the running statistics
and no dropout, so it is an exact bijection with an exact log-determinant.

Parameters ``{"net": {"high": stacked (blocks_high, ...), "down": ..., "low": stacked,
"dense": ...}, "bn": same tree of {"mean", "var"}}``; ``bn`` is not trained by gradients.

Differences from the authors' code, on purpose: the DCT is orthonormal (log-det 0) rather than
their rescaled one; the conditioning split of the AIO block follows their ``c - c//2``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.errors import CfjaxError
from cfjax.models.flows import reshape

ARCH = "ibinn"
_DN = ("NHWC", "HWIO", "NHWC")


@dataclass(frozen=True)
class IBINNConfig:
    """Static configuration of the IB-INN flow. Defaults: the authors' MNIST network."""

    image_shape: tuple[int, int, int] = (28, 28, 1)
    blocks_high: int = 24  # AIO blocks at (H/2, W/2)
    blocks_low: int = 24  # AIO blocks at (H/4, W/4)
    width_high: int = 32
    width_low: int = 64
    clamp: float = 0.7  # AIO / downsampling soft clamp of the log-scale
    block_scale: float = 0.8  # fixed per-block global scale after the mixing (1.0: none)
    dropout_low: float = 0.25  # Dropout2d in the low-resolution subnets (training only)
    mixing: str = "orthogonal"  # "orthogonal" (fixed random rotation) | "permutation"
    mixing_seed: int = 0
    batchnorm: bool = True
    bn_momentum: float = 0.999  # PyTorch convention: weight of the new batch
    bn_eps: float = 1e-4
    dense: bool = True  # DCT pooling + one dense coupling over all D dimensions
    dense_width: int = 1024
    dense_dropout: float = 0.5
    dense_clamp: float = 2.0
    arch: str = ARCH

    def __post_init__(self):
        try:
            shape = tuple(int(s) for s in self.image_shape)
        except (TypeError, ValueError) as e:
            raise CfjaxError(f"IBINNConfig.image_shape must be (H, W, C) integers, got {self.image_shape!r}") from e
        if len(shape) != 3 or any(s <= 0 for s in shape) or shape[0] % 4 or shape[1] % 4:
            raise CfjaxError(f"IBINNConfig.image_shape must be (H, W, C) with H and W divisible by 4, got {shape}")
        object.__setattr__(self, "image_shape", shape)
        for name in ("blocks_high", "blocks_low", "width_high", "width_low", "dense_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name.startswith("blocks") else 1):
                raise CfjaxError(f"IBINNConfig.{name} must be a {'non-negative' if name.startswith('blocks') else 'positive'} integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name, lo, hi in (("clamp", 0, math.inf), ("block_scale", 0, math.inf), ("dense_clamp", 0, math.inf),
                             ("bn_eps", 0, math.inf), ("bn_momentum", 0, 1.0 + 1e-12)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (lo < v < hi) or not math.isfinite(v):
                raise CfjaxError(f"IBINNConfig.{name} must be a finite number in ({lo}, {hi if hi != math.inf else 'inf'}), got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("dropout_low", "dense_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating)) or not 0 <= v < 1:
                raise CfjaxError(f"IBINNConfig.{name} must be in [0, 1), got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.mixing not in ("orthogonal", "permutation"):
            raise CfjaxError(f"IBINNConfig.mixing must be 'orthogonal' or 'permutation', got {self.mixing!r}")
        if self.arch != ARCH:
            raise CfjaxError(f"IBINNConfig.arch must be {ARCH!r}, got {self.arch!r}")
        for name in ("batchnorm", "dense"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise CfjaxError(f"IBINNConfig.{name} must be a bool, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "IBINNConfig":
        from cfjax.models.glow import config_from_dict

        return config_from_dict(cls, d)

    @property
    def latent_dim(self) -> int:
        return int(math.prod(self.image_shape))

    @property
    def high_shape(self) -> tuple[int, int, int]:
        h, w, c = self.image_shape
        return h // 2, w // 2, 4 * c

    @property
    def low_shape(self) -> tuple[int, int, int]:
        h, w, c = self.image_shape
        return h // 4, w // 4, 16 * c


# ----------------------------------------------------------------------------------------------
# Fixed (non-learned) transforms, derived from the config.


@lru_cache(maxsize=None)
def _mixings(mixing: str, seed: int, stage: int, n: int, c: int) -> np.ndarray:
    """(n, c, c) fixed channel mixings of one stage: random rotations (det +1) or permutations."""
    rng = np.random.default_rng([seed, stage])
    out = np.zeros((n, c, c), np.float32)
    for i in range(n):
        if mixing == "permutation":
            out[i, np.arange(c), rng.permutation(c)] = 1.0
        else:
            q, r = np.linalg.qr(rng.standard_normal((c, c)))
            q = q * np.sign(np.diag(r))[None, :]
            if np.linalg.det(q) < 0:
                q[:, 0] = -q[:, 0]
            out[i] = q
    return out


@lru_cache(maxsize=None)
def _dense_permutation(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 99]).permutation(dim)


def mixings(config: IBINNConfig, stage: str) -> np.ndarray:
    """The fixed channel mixings of ``stage`` ("high" or "low"): (blocks, c, c), block i's Q."""
    if stage not in ("high", "low"):
        raise CfjaxError(f"IB-INN stage must be 'high' or 'low', got {stage!r}")
    n, c = (config.blocks_high, config.high_shape[-1]) if stage == "high" else (config.blocks_low, config.low_shape[-1])
    return _mixings(config.mixing, config.mixing_seed, 0 if stage == "high" else 1, n, c)


def dense_permutation(config: IBINNConfig) -> np.ndarray:
    """The fixed permutation (D,) applied to the DCT coefficients before the dense coupling."""
    return _dense_permutation(config.mixing_seed, config.latent_dim)


@lru_cache(maxsize=None)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): ``X[k] = sum_i M[k, i] x[i]``."""
    i = np.arange(n)[None, :]
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


def dct_forward(x: jax.Array) -> jax.Array:
    """(B, n, n, c) -> (B, n*n*c): orthonormal 2-D DCT of each channel, flattened (k_h, k_w, c)."""
    m = jnp.asarray(dct_matrix(x.shape[1]))
    y = jnp.einsum("ki,lj,bijc->bklc", m, m, x)
    return y.reshape(x.shape[0], -1)


def dct_inverse(v: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """(B, n*n*c) -> (B, n, n, c): exact inverse of :func:`dct_forward`."""
    n = shape[0]
    m = jnp.asarray(dct_matrix(n))
    y = v.reshape(v.shape[0], *shape)
    return jnp.einsum("ki,lj,bklc->bijc", m, m, y)


# ----------------------------------------------------------------------------------------------
# Subnets.


def _kaiming(rng: np.random.Generator, shape: tuple[int, ...], gain: float = 1.0) -> jnp.ndarray:
    fan_in = int(np.prod(shape[:-1]))
    return jnp.asarray(rng.standard_normal(shape) * math.sqrt(2.0 / fan_in) * gain, jnp.float32)


def _init_conv_subnet(rng, c_in: int, width: int, c_out: int, batchnorm: bool) -> tuple[dict, dict]:
    """Params and BN statistics of conv3x3 - BN - ReLU - conv3x3 - BN - ReLU - conv1x1."""
    p = {"conv1": _kaiming(rng, (3, 3, c_in, width)), "conv2": _kaiming(rng, (3, 3, width, width)),
         "conv3": {"w": _kaiming(rng, (1, 1, width, c_out)), "b": jnp.zeros((c_out,), jnp.float32)}}
    stats = {}
    for name in ("norm1", "norm2"):
        if batchnorm:
            p[name] = {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}
            stats[name] = {"mean": jnp.zeros((width,), jnp.float32), "var": jnp.ones((width,), jnp.float32)}
        else:
            p[name] = {"bias": jnp.zeros((width,), jnp.float32)}
    return p, stats


def _conv(x, w, stride: int = 1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME" if stride == 1 else ((1, 1), (1, 1)),
                                        dimension_numbers=_DN)


class _Mode:
    """What a forward pass needs to know beyond parameters: train/eval, BN momentum, dropout keys."""

    def __init__(self, config: IBINNConfig, train: bool, key, dropout: bool):
        self.config, self.train, self.key, self.dropout = config, train, key, dropout and train and key is not None
        self.count = 0

    def next_key(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def _norm(p: dict, stats: dict | None, h: jax.Array, mode: _Mode):
    """BN (or a bias) of h (B, h, w, c). Returns (h, new stats or None)."""
    cfg = mode.config
    if "scale" not in p:
        return h + p["bias"], None
    if mode.train:
        mean = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
        n = h.shape[0] * h.shape[1] * h.shape[2]
        m = cfg.bn_momentum
        unbiased = var * (n / max(n - 1, 1))
        new = {"mean": (1 - m) * stats["mean"] + m * jax.lax.stop_gradient(mean),
               "var": (1 - m) * stats["var"] + m * jax.lax.stop_gradient(unbiased)}
    else:
        mean, var, new = stats["mean"], stats["var"], None
    return (h - mean) * jax.lax.rsqrt(var + cfg.bn_eps) * p["scale"] + p["bias"], new


# Eval-mode BatchNorm folded into the convolutions (see _conv_norm). Read when a function is traced;
# ``benchmarks.bn_fold`` sets it to False to time the unfolded program. Leave it True.
FOLD_BATCHNORM = True


def _conv_norm(w: jax.Array, p: dict, stats: dict | None, x: jax.Array, mode: _Mode, stride: int = 1):
    """BN(conv(x, w)) (or conv + bias). In eval mode the BN is an affine map per output channel and
    is folded into the convolution: conv(x, w k) + (bias - mean k), k = scale / sqrt(var + eps).
    With XLA:CPU's YNNPACK eltwise fusion (cfjax.xla_cpu) a subnet is then conv + bias + ReLU, which
    the fusion absorbs; ECINN runs 1.1-1.3x faster (``python -m benchmarks.bn_fold``). The same
    function up to float32 rounding."""
    if mode.train or "scale" not in p or not FOLD_BATCHNORM:
        return _norm(p, stats, _conv(x, w, stride), mode)
    k = p["scale"] * jax.lax.rsqrt(stats["var"] + mode.config.bn_eps)
    return _conv(x, w * k, stride) + (p["bias"] - stats["mean"] * k), None


def _dropout2d(h: jax.Array, rate: float, mode: _Mode) -> jax.Array:
    if not mode.dropout or rate <= 0:
        return h
    keep = jax.random.bernoulli(mode.next_key(), 1.0 - rate, (h.shape[0], 1, 1, h.shape[-1]))
    return jnp.where(keep, h / (1.0 - rate), 0.0)


def _conv_subnet(p: dict, stats: dict, x: jax.Array, mode: _Mode, *, relu_first: bool, stride: int = 1,
                 dropout: float = 0.0):
    """Returns (raw output, new stats)."""
    if relu_first:
        x = jax.nn.relu(x)
    new = {}
    h, new["norm1"] = _conv_norm(p["conv1"], p["norm1"], stats.get("norm1"), x, mode)
    h = jax.nn.relu(h)
    h, new["norm2"] = _conv_norm(p["conv2"], p["norm2"], stats.get("norm2"), h, mode, stride)
    h = _dropout2d(jax.nn.relu(h), dropout, mode)
    out = _conv(h, p["conv3"]["w"]) + p["conv3"]["b"]
    return out, {k: v for k, v in new.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# Blocks. Each takes (params, stats, x, mode) and returns (y, logdet (B,), new stats).


def _aio_forward(p, stats, q, x, mode: _Mode, dropout: float):
    cfg = mode.config
    c = x.shape[-1]
    c1 = c - c // 2
    a, new = _conv_subnet(p, stats, x[..., :c1], mode, relu_first=True, dropout=dropout)
    s = cfg.clamp * jnp.tanh(0.1 * a[..., : c - c1])
    y2 = x[..., c1:] * jnp.exp(s) + a[..., c - c1 :]
    y = cfg.block_scale * (jnp.concatenate([x[..., :c1], y2], -1) @ q.T)
    ld = jnp.sum(s, axis=(1, 2, 3)) + x.shape[1] * x.shape[2] * c * math.log(cfg.block_scale)
    return y, ld, new


def _aio_inverse(p, stats, q, y, mode: _Mode):
    cfg = mode.config
    c = y.shape[-1]
    c1 = c - c // 2
    v = (y / cfg.block_scale) @ q
    a, _ = _conv_subnet(p, stats, v[..., :c1], mode, relu_first=True)
    s = cfg.clamp * jnp.tanh(0.1 * a[..., : c - c1])
    x2 = (v[..., c1:] - a[..., c - c1 :]) * jnp.exp(-s)
    return jnp.concatenate([v[..., :c1], x2], -1)


def _affine_tanh(x, a, clamp: float, rev: bool = False):
    c = x.shape[-1]
    s = clamp * jnp.tanh(0.2 * a[..., :c])
    if rev:
        return (x - a[..., c:]) * jnp.exp(-s), -jnp.sum(s, axis=(1, 2, 3))
    return x * jnp.exp(s) + a[..., c:], jnp.sum(s, axis=(1, 2, 3))


def _down_forward(p, stats, x, mode: _Mode):
    c = x.shape[-1]
    c1 = c // 2
    x1, x2 = x[..., :c1], x[..., c1:]
    a1, n_hi = _conv_subnet(p["strided"], stats["strided"], x1, mode, relu_first=False, stride=2)
    y2, ld2 = _affine_tanh(reshape.squeeze(x2), a1, mode.config.clamp)
    a2, n_lo = _conv_subnet(p["lowres"], stats["lowres"], y2, mode, relu_first=False)
    y1, ld1 = _affine_tanh(reshape.squeeze(x1), a2, mode.config.clamp)
    return jnp.concatenate([y1, y2], -1), ld1 + ld2, {"strided": n_hi, "lowres": n_lo}


def _down_inverse(p, stats, y, mode: _Mode, c: int):
    c1 = c // 2
    y1, y2 = y[..., : 4 * c1], y[..., 4 * c1 :]
    a2, _ = _conv_subnet(p["lowres"], stats["lowres"], y2, mode, relu_first=False)
    x1 = reshape.unsqueeze(_affine_tanh(y1, a2, mode.config.clamp, rev=True)[0])
    a1, _ = _conv_subnet(p["strided"], stats["strided"], x1, mode, relu_first=False, stride=2)
    x2 = reshape.unsqueeze(_affine_tanh(y2, a1, mode.config.clamp, rev=True)[0])
    return jnp.concatenate([x1, x2], -1)


def _fc(p, x, mode: _Mode):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    rate = mode.config.dense_dropout
    if mode.dropout and rate > 0:
        keep = jax.random.bernoulli(mode.next_key(), 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h @ p["w2"] + p["b2"]


def _atan_affine(x, raw, clamp: float, rev: bool = False):
    d = x.shape[-1]
    s = clamp * (2.0 / math.pi) * jnp.arctan(raw[..., :d] / clamp)
    if rev:
        return (x - raw[..., d:]) * jnp.exp(-s), -jnp.sum(s, -1)
    return x * jnp.exp(s) + raw[..., d:], jnp.sum(s, -1)


def _dense_forward(p, v, mode: _Mode):
    d1 = v.shape[-1] // 2
    v1, v2 = v[:, :d1], v[:, d1:]
    v1, ld1 = _atan_affine(v1, _fc(p["fc2"], v2, mode), mode.config.dense_clamp)
    v2, ld2 = _atan_affine(v2, _fc(p["fc1"], v1, mode), mode.config.dense_clamp)
    return jnp.concatenate([v1, v2], -1), ld1 + ld2


def _dense_inverse(p, v, mode: _Mode):
    d1 = v.shape[-1] // 2
    v1, v2 = v[:, :d1], v[:, d1:]
    v2, _ = _atan_affine(v2, _fc(p["fc1"], v1, mode), mode.config.dense_clamp, rev=True)
    v1, _ = _atan_affine(v1, _fc(p["fc2"], v2, mode), mode.config.dense_clamp, rev=True)
    return jnp.concatenate([v1, v2], -1)


# ----------------------------------------------------------------------------------------------
# The network.


def _stack(trees: list):
    if not trees:
        return {}
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def init_ibinn(key: jax.Array, config: IBINNConfig) -> dict:
    """Parameters and BN statistics ``{"net": ..., "bn": ...}`` (host-side draws seeded by ``key``)."""
    from cfjax.models.flows.conv1x1 import key_rng

    rng = key_rng(key)
    bn = config.batchnorm
    _, _, ch = config.high_shape
    _, _, cl = config.low_shape
    net, stats = {}, {}
    for name, n, c, width in (("high", config.blocks_high, ch, config.width_high),
                              ("low", config.blocks_low, cl, config.width_low)):
        blocks = [_init_conv_subnet(rng, c - c // 2, width, 2 * (c // 2), bn) for _ in range(n)]
        net[name] = _stack([b[0] for b in blocks])
        stats[name] = _stack([b[1] for b in blocks])
    c1, c2 = ch // 2, ch - ch // 2
    s_p, s_s = _init_conv_subnet(rng, c1, 2 * config.width_high, 8 * c2, bn)
    l_p, l_s = _init_conv_subnet(rng, 4 * c2, 2 * config.width_high, 8 * c1, bn)
    net["down"] = {"strided": s_p, "lowres": l_p}
    stats["down"] = {"strided": s_s, "lowres": l_s}
    if config.dense:
        d = config.latent_dim
        d1, d2 = d // 2, d - d // 2
        fcs = {}
        for name, d_in, d_out in (("fc1", d1, d2), ("fc2", d2, d1)):
            fcs[name] = {"w1": _kaiming(rng, (d_in, config.dense_width), 0.1),
                         "b1": jnp.zeros((config.dense_width,), jnp.float32),
                         "w2": _kaiming(rng, (config.dense_width, 2 * d_out), 0.1),
                         "b2": jnp.zeros((2 * d_out,), jnp.float32)}
        net["dense"] = fcs
    return {"net": net, "bn": stats}


def _check_input(config: IBINNConfig, x: jax.Array, what: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != config.image_shape:
        raise CfjaxError(f"{what}: expected shape (B, {', '.join(map(str, config.image_shape))}), got {tuple(x.shape)}")


def _index(tree, i: int):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


# Eval-mode passes run each stage's blocks as one lax.scan over the stacked block parameters
# instead of unrolling them: the same operations in the same order (the same latents on XLA:CPU,
# tests/test_ibinn.py), compiled once per stage instead of once per block. For the authors' 24 + 24
# blocks an encode compiled in 2.0 s instead of 7.6 s on 2 CPU cores, and ECINN ran 1.03-1.05x
# faster (python -m benchmarks.scan_blocks). Training (train=True) stays unrolled: its dropout keys
# are drawn per block in sequence. Read when a function is traced; set to False for the unrolled
# program.
SCAN_BLOCKS = True
SCAN_UNROLL = 2  # blocks per scan iteration: 1 compiles fastest but ran batch 16 at 0.91x (benchmarks.scan_blocks)


def _scan_blocks_forward(net_stage: dict, bn_stage: dict, qs: np.ndarray, x: jax.Array, mode: _Mode):
    """Eval-mode blocks of one stage as a scan: x -> (y, summed log-determinant (B,))."""
    def body(carry, blk):
        h, logdet = carry
        h, ld, _ = _aio_forward(*blk, h, mode, 0.0)
        return (h, logdet + ld), None

    (x, logdet), _ = jax.lax.scan(body, (x, jnp.zeros(x.shape[:1], x.dtype)), (net_stage, bn_stage, jnp.asarray(qs)), unroll=SCAN_UNROLL)
    return x, logdet


def ibinn_forward(params: dict, config: IBINNConfig, x: jax.Array, *, train: bool = False,
                  key: jax.Array | None = None, dropout: bool = True):
    """x (B, H, W, C) -> (z (B, D), log|det dz/dx| (B,), new BN statistics).

    Eval mode (``train=False``) returns the given statistics unchanged. In train mode, BN uses
    batch statistics and, when ``key`` is given and ``dropout``, dropout is applied.
    """
    _check_input(config, x, "ibinn_forward")
    mode = _Mode(config, train, key, dropout)
    net, bn = params["net"], params["bn"]
    x, logdet = reshape.haar_forward(x.astype(jnp.float32))
    new_bn: dict[str, Any] = {"high": [], "low": []}
    for name, n, dropout_rate in (("high", config.blocks_high, 0.0), ("low", config.blocks_low, config.dropout_low)):
        if name == "low":
            x, ld, new_bn["down"] = _down_forward(net["down"], bn["down"], x, mode)
            logdet = logdet + ld
        qs = mixings(config, name)
        if not train and n and SCAN_BLOCKS:
            x, ld = _scan_blocks_forward(net[name], bn[name], qs, x, mode)
            logdet = logdet + ld
            continue
        for i in range(n):
            x, ld, st = _aio_forward(_index(net[name], i), _index(bn[name], i), jnp.asarray(qs[i]), x, mode, dropout_rate)
            logdet = logdet + ld
            new_bn[name].append(st)
    if config.dense:
        v = dct_forward(x)[:, dense_permutation(config)]
        z, ld = _dense_forward(net["dense"], v, mode)
        logdet = logdet + ld
    else:
        z = x.reshape(x.shape[0], -1)
    if not train:
        return z, logdet, bn
    new_bn = {"high": _stack(new_bn["high"]), "low": _stack(new_bn["low"]), "down": new_bn["down"]}
    return z, logdet, new_bn


def ibinn_inverse(params: dict, config: IBINNConfig, z: jax.Array) -> jax.Array:
    """z (B, D) -> x (B, H, W, C): the exact inverse of :func:`ibinn_forward` in eval mode."""
    if z.ndim != 2 or z.shape[1] != config.latent_dim:
        raise CfjaxError(f"ibinn_inverse: expected z of shape (B, {config.latent_dim}), got {tuple(z.shape)}")
    mode = _Mode(config, False, None, False)
    net, bn = params["net"], params["bn"]
    low = config.low_shape
    z = z.astype(jnp.float32)
    if config.dense:
        v = _dense_inverse(net["dense"], z, mode)
        perm = dense_permutation(config)
        x = dct_inverse(v[:, np.argsort(perm)], low)
    else:
        x = z.reshape(z.shape[0], *low)
    for name, n in (("low", config.blocks_low), ("high", config.blocks_high)):
        qs = mixings(config, name)
        if n and SCAN_BLOCKS:
            x, _ = jax.lax.scan(lambda h, blk: (_aio_inverse(*blk, h, mode), None), x, (net[name], bn[name], jnp.asarray(qs)), reverse=True, unroll=SCAN_UNROLL)
        else:
            for i in reversed(range(n)):
                x = _aio_inverse(_index(net[name], i), _index(bn[name], i), jnp.asarray(qs[i]), x, mode)
        if name == "low":
            x = _down_inverse(net["down"], bn["down"], x, mode, config.high_shape[-1])
    return reshape.haar_inverse(x)[0]
