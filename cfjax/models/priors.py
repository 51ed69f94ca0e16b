"""Image parametrisations for DISC ("stronger image priors"): one image per parameter pytree.

Every prior is a frozen (hashable) dataclass, so it can be a static argument of ``jax.jit``, with
the same per-example interface (no batch axis; ``jax.vmap`` adds one):

    params, aux = prior.init(key, query)      query (H, W, C) in [0, 1]
    image       = prior.render(params, aux)   -> (H, W, C) in [0, 1]   (differentiable in params)

``params`` are what the optimiser changes; ``aux`` is fixed per example (the DIP noise input,
the INR coordinates and Fourier matrix, the pixel prior's base logits). The generator priors start
from random weights, so they are first fitted to the query by :func:`fit_to_query` (MSE, Adam,
``lax.scan``) and the counterfactual optimisation then starts at render(params) ~= query.

- :class:`Pixels`: ``x = sigmoid(base + up(delta))``, base = logit(query clipped to [eps, 1-eps]),
  delta = 0 at init (so x = query up to eps) and ``factor`` > 1 optimises delta at 1/factor
  resolution (bilinear up-sampling; the coarse stage of coarse-to-fine). The image-space baseline
  (Deep Dream / DeepInversion), kept in [0, 1] by construction instead of by clipping.
- :class:`DIP`: deep image prior (Ulyanov et al. 2018): an untrained conv encoder-decoder with
  skip connections maps fixed noise (H, W, noise_channels) to the image; sigmoid output.
- :class:`INR`: implicit neural representation (Tancik et al. 2020): an MLP over pixel
  coordinates u in [0, 1]^2 with Fourier features gamma(u) = [sin 2 pi B u, cos 2 pi B u],
  B (num_features, 2) ~ N(0, scale^2); sigmoid output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from cfjax.errors import CfjaxError

PRIORS = ("pixels", "dip", "inr")


def _upsample(d: jax.Array, hw: tuple[int, ...]) -> jax.Array:
    """Bilinear resize of (h, w, C) to (H, W, C) (identity when the sizes already match)."""
    if d.shape[:2] == tuple(hw):
        return d
    return jax.image.resize(d, (*hw, d.shape[-1]), "bilinear")


@dataclass(frozen=True)
class Pixels:
    """Logit-parametrised pixels: ``render = sigmoid(base + up(delta))``; needs no fitting."""

    eps: float = 1e-3
    factor: int = 1          # delta lives at (ceil(H/factor), ceil(W/factor)) resolution
    default_lr: float = 0.1

    name = "pixels"
    needs_fit = False

    def init(self, key: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
        """query (H, W, C) -> (delta (h, w, C) zeros, base (H, W, C) logits of the query)."""
        del key
        q = jnp.clip(query, self.eps, 1.0 - self.eps)
        base = jnp.log(q) - jnp.log1p(-q)
        h, w, c = query.shape
        delta = jnp.zeros((-(-h // self.factor), -(-w // self.factor), c), query.dtype)
        return delta, base

    def render(self, params: jax.Array, aux: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(aux + _upsample(params, aux.shape[:2]))

    def refine(self, params: jax.Array, aux: jax.Array) -> tuple["Pixels", jax.Array, jax.Array]:
        """Params / aux of a coarser Pixels prior -> this prior's, same image: (self, zero delta, base)."""
        base = aux + _upsample(params, aux.shape[:2])
        h, w, c = aux.shape
        return self, jnp.zeros((-(-h // self.factor), -(-w // self.factor), c), aux.dtype), base


def _resize_to(h: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, H, W, C): pixel repetition for exact 2x, bilinear otherwise."""
    if (h.shape[1] * 2, h.shape[2] * 2) == tuple(hw):
        return jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)
    return jax.image.resize(h, (h.shape[0], *hw, h.shape[-1]), "bilinear")


def _patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels (flax's layout) as shifted
    strided slices of the padded input, concatenated on channels, times the kernel as a
    (kh*kw*Cin, Cout) matrix. Same result up to float32 summation order; under ``jax.vmap`` over
    per-example kernels (every DISC query has its own generator) this is a batched matmul,
    where ``lax.conv_general_dilated`` becomes a grouped convolution with one group per example,
    which XLA:CPU runs at a few GFLOP/s."""
    del dimension_numbers  # flax passes ("NHWC", "HWIO", "NHWC")
    if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())) or feature_group_count != 1:
        raise NotImplementedError("_patch_conv: no dilation or feature groups")
    kh, kw, cin, cout = rhs.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    sh, sw = window_strides
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, -1)
    return jnp.einsum("nhwk,kc->nhwc", patches, rhs.reshape(kh * kw * cin, cout), precision=precision)


class _DIPNet(nn.Module):
    """Conv encoder-decoder with 1x1-conv skips; (1, H, W, Cz) -> (1, H, W, C) in (0, 1)."""

    channels: tuple[int, ...]
    skip_channels: int
    out_channels: int
    patch_conv: bool = True

    @nn.compact
    def __call__(self, z):
        def _conv(features, kernel, strides=1):
            return nn.Conv(features, kernel, strides=strides, conv_general_dilated=_patch_conv if self.patch_conv else None)

        act = lambda t: nn.leaky_relu(t, 0.2)  # noqa: E731
        norm = lambda t: nn.GroupNorm(num_groups=min(4, t.shape[-1]))(t)  # noqa: E731  per-image: vmappable
        h, skips = z, []
        for c in self.channels:
            skips.append(act(norm(_conv(self.skip_channels, (1, 1))(h))))
            h = act(norm(_conv(c, (3, 3), strides=2)(h)))
            h = act(norm(_conv(c, (3, 3))(h)))
        for c, s in zip(reversed(self.channels), reversed(skips)):
            h = _resize_to(h, s.shape[1:3])
            h = act(norm(_conv(c, (3, 3))(jnp.concatenate([h, s], -1))))
        return jax.nn.sigmoid(_conv(self.out_channels, (1, 1))(h))


@dataclass(frozen=True)
class DIP:
    """Deep image prior: ``render = net_params(noise)`` with fixed noise (H, W, noise_channels)."""

    channels: tuple[int, ...] = (16, 32)
    skip_channels: int = 4
    noise_channels: int = 8
    noise_scale: float = 1.0
    default_lr: float = 0.003
    patch_conv: bool = True  # convolutions as patches x matrix (fast under vmap); False: lax.conv (same result)

    name = "dip"
    needs_fit = True

    def _net(self, out_channels: int) -> _DIPNet:
        return _DIPNet(tuple(self.channels), self.skip_channels, out_channels, self.patch_conv)

    def init(self, key: jax.Array, query: jax.Array) -> tuple[Any, dict]:
        """query (H, W, C) -> (network params, {"noise": (H, W, noise_channels)}), random weights."""
        k_noise, k_net = jax.random.split(key)
        h, w, c = query.shape
        noise = self.noise_scale * jax.random.uniform(k_noise, (h, w, self.noise_channels), query.dtype)
        params = self._net(c).init(k_net, noise[None])["params"]
        return params, {"noise": noise, "channels": jnp.zeros((c,), query.dtype)}

    def render(self, params: Any, aux: dict) -> jax.Array:
        c = aux["channels"].shape[0]
        return self._net(c).apply({"params": params}, aux["noise"][None])[0]


class _INRNet(nn.Module):
    hidden: int
    depth: int
    out_channels: int

    @nn.compact
    def __call__(self, g):
        for _ in range(self.depth):
            g = nn.relu(nn.Dense(self.hidden)(g))
        return jax.nn.sigmoid(nn.Dense(self.out_channels)(g))


@dataclass(frozen=True)
class INR:
    """Fourier-feature MLP over pixel coordinates; ``render`` evaluates it on the pixel grid."""

    num_features: int = 64
    scale: float = 4.0
    hidden: int = 64
    depth: int = 3
    default_lr: float = 0.003

    name = "inr"
    needs_fit = True

    def _net(self, out_channels: int) -> _INRNet:
        return _INRNet(self.hidden, self.depth, out_channels)

    def init(self, key: jax.Array, query: jax.Array) -> tuple[Any, dict]:
        """query (H, W, C) -> (MLP params, {"coords": (H, W, 2), "B": (num_features, 2)})."""
        k_b, k_net = jax.random.split(key)
        h, w, c = query.shape
        uu, vv = jnp.meshgrid(jnp.arange(h, dtype=query.dtype) / h, jnp.arange(w, dtype=query.dtype) / w, indexing="ij")
        coords = jnp.stack([uu, vv], -1)
        b = self.scale * jax.random.normal(k_b, (self.num_features, 2), query.dtype)
        aux = {"coords": coords, "B": b, "channels": jnp.zeros((c,), query.dtype)}
        params = self._net(c).init(k_net, fourier_features(coords, b))["params"]
        return params, aux

    def render(self, params: Any, aux: dict) -> jax.Array:
        c = aux["channels"].shape[0]
        return self._net(c).apply({"params": params}, fourier_features(aux["coords"], aux["B"]))  # type: ignore[return-value]


def fourier_features(coords: jax.Array, b: jax.Array) -> jax.Array:
    """gamma(u) = [sin 2 pi B u, cos 2 pi B u]: coords (..., 2), B (F, 2) -> (..., 2F)."""
    proj = 2.0 * jnp.pi * coords @ b.T
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], -1)


Prior = Pixels | DIP | INR


def make_prior(name: str, **kwargs) -> Prior:
    """The prior called ``name`` ("pixels", "dip" or "inr"), with dataclass fields as kwargs."""
    table = {"pixels": Pixels, "dip": DIP, "inr": INR}
    if name not in table:
        raise CfjaxError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)}")
    return table[name](**kwargs)


def fit_to_query(prior: Prior, params: Any, aux: Any, query: jax.Array, steps: int, lr: float) -> tuple[Any, jax.Array]:
    """Fit one example's generator to its query: Adam on mean((render - query)^2), ``steps`` steps.

    query (H, W, C). Returns (params, final MSE ()). Pure and vmappable; one ``lax.scan``.
    A prior that needs no fitting (``needs_fit`` False) is returned unchanged.
    """
    if not prior.needs_fit or steps <= 0:
        return params, jnp.mean((prior.render(params, aux) - query) ** 2)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))

    def mse(p):
        return jnp.mean((prior.render(p, aux) - query) ** 2)

    def body(carry, _):
        p, s = carry
        g = jax.grad(mse)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return params, mse(params)
