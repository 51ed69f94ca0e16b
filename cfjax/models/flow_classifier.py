"""The ECINN model: a Glow flow with class-conditional latent Gaussians (IB-INN), as one bundle.

Images enter in [0, 1] and are mapped before the flow by ``config.preprocess``:

- ``"affine"`` (default): ``u = 2 x - 1``, the IB-INN normalisation.
- ``"logit"``: ``u = logit(a + (1 - 2a) x)`` with ``a = logit_alpha`` (RealNVP/Glow). Decoded
  images stay within [-a/(1-2a), 1 + a/(1-2a)]. Measured on mnist5k (beta 8, same budget) it
  gave better bits/dim (3.12 vs 4.32) but lower accuracy (95.9% vs 97.6%) and *lower* ECINN
  validity (65% vs 87% before refinement): off-manifold latents decode to saturated pixels
  that re-encode elsewhere. Kept as an option, not the default.

``encode`` adds the map's log-determinant, so every log-likelihood here is of the [0, 1] image.

Parameters: ``{"glow": ..., "latent": {"mu": (C, D), "logit_prior": (C,)},
"class_means": (C, D)}`` where ``class_means[c]`` is the mean latent of the training images the
model *predicts* as ``c`` (ECINN's translation directions), filled in after training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError
from cfjax.models import latent as latent_lib
from cfjax.models import ibinn
from cfjax.models.glow import GlowConfig, glow_forward, glow_inverse, init_glow
from cfjax.models.ibinn import IBINNConfig
from cfjax.models.latent import LatentConfig


PREPROCESS = ("logit", "affine")
# What the training noise does at the ends of the pixel range: "reflect" folds x + noise back into
# [0, 1]; "none" leaves it outside (the IB-INN authors' data pipeline; needs the affine map).
NOISE_BOUNDARIES = ("reflect", "none")


@dataclass(frozen=True)
class FlowClassifierConfig:
    glow: GlowConfig | IBINNConfig = field(default_factory=GlowConfig)  # the flow (either architecture)
    latent: LatentConfig = field(default_factory=LatentConfig)
    noise_sigma: float = 0.01        # training-time Gaussian input noise (after U(0, 1/256) dequantisation)
    dequantize_bins: int = 256
    preprocess: str = "affine"       # "affine" (IB-INN's 2x - 1) | "logit"
    logit_alpha: float = 0.01
    noise_boundary: str = "reflect"  # training noise at 0 and 1: "reflect" | "none" (see dequantize)

    def __post_init__(self):
        if self.preprocess not in PREPROCESS:
            raise CfjaxError(f"FlowClassifierConfig.preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if self.noise_boundary not in NOISE_BOUNDARIES:
            raise CfjaxError(f"FlowClassifierConfig.noise_boundary must be one of {NOISE_BOUNDARIES}, got {self.noise_boundary!r}")
        if self.noise_boundary == "none" and self.preprocess == "logit":
            raise CfjaxError("noise_boundary 'none' leaves noisy pixels outside [0, 1], where the logit map is undefined: "
                             "use preprocess 'affine' or noise_boundary 'reflect'")
        if not 0 < self.logit_alpha < 0.5:
            raise CfjaxError(f"FlowClassifierConfig.logit_alpha must be in (0, 0.5), got {self.logit_alpha}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.glow.image_shape)

    @property
    def num_classes(self) -> int:
        return self.latent.num_classes

    @property
    def latent_dim(self) -> int:
        return int(math.prod(self.glow.image_shape))

    def to_dict(self) -> dict:
        return {
            "glow": self.glow.to_dict(),
            "latent": self.latent.to_dict(),
            "noise_sigma": self.noise_sigma,
            "dequantize_bins": self.dequantize_bins,
            "preprocess": self.preprocess,
            "logit_alpha": self.logit_alpha,
            "noise_boundary": self.noise_boundary,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FlowClassifierConfig":
        try:
            return cls(
                glow=flow_config_from_dict(d["glow"]),
                latent=LatentConfig.from_dict(d["latent"]),
                noise_sigma=float(d.get("noise_sigma", 0.01)),
                dequantize_bins=int(d.get("dequantize_bins", 256)),
                preprocess=str(d.get("preprocess", "affine")),  # configs without the field predate "logit"
                logit_alpha=float(d.get("logit_alpha", 0.01)),
                noise_boundary=str(d.get("noise_boundary", "reflect")),  # configs without the field reflected
            )
        except (KeyError, TypeError) as e:
            raise CfjaxError(f"not a flow-classifier config ({type(e).__name__}: {e})") from e


def flow_config_from_dict(d: dict) -> GlowConfig | IBINNConfig:
    """The flow's config from its dict; ``"arch": "ibinn"`` marks the IB-INN network, else Glow."""
    return IBINNConfig.from_dict(d) if d.get("arch") == ibinn.ARCH else GlowConfig.from_dict(d)


def is_ibinn(config: FlowClassifierConfig) -> bool:
    return isinstance(config.glow, IBINNConfig)


def init_flow_classifier(key: jax.Array, config: FlowClassifierConfig, x_init: jax.Array) -> dict:
    """x_init (B, H, W, C) in [0, 1]: a batch for the data-dependent initialisation (Glow's ActNorm,
    IB-INN's BatchNorm running statistics)."""
    k_glow, k_lat = jax.random.split(key)
    u = to_flow_space(config, jnp.asarray(x_init, jnp.float32))[0]
    if is_ibinn(config):
        glow = ibinn.init_ibinn(k_glow, cast(IBINNConfig, config.glow))
        glow = dict(glow, bn=_batch_stats(glow, config.glow, u))
    else:
        glow = init_glow(k_glow, cast(GlowConfig, config.glow), u)
    lat = latent_lib.init_latent(k_lat, config.latent, config.latent_dim)
    return {"glow": glow, "latent": lat, "class_means": jnp.array(lat["mu"])}


def to_flow_space(config: FlowClassifierConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The fixed preprocessing map: x (B, H, W, C) in [0, 1] -> (u, log|det du/dx| (B,))."""
    if config.preprocess == "affine":
        return 2.0 * x - 1.0, jnp.full(x.shape[:1], config.latent_dim * math.log(2.0))
    a = config.logit_alpha
    s = a + (1.0 - 2.0 * a) * x
    u = jnp.log(s) - jnp.log1p(-s)
    logdet = jnp.sum(math.log(1.0 - 2.0 * a) - jnp.log(s) - jnp.log1p(-s), axis=(1, 2, 3))
    return u, logdet


def from_flow_space(config: FlowClassifierConfig, u: jax.Array) -> jax.Array:
    """Inverse of :func:`to_flow_space` (not clipped)."""
    if config.preprocess == "affine":
        return 0.5 * (u + 1.0)
    a = config.logit_alpha
    return (jax.nn.sigmoid(u) - a) / (1.0 - 2.0 * a)


@partial(jax.jit, static_argnums=1)
def _batch_stats(flow_params: dict, config: IBINNConfig, u: jax.Array) -> dict:
    """BatchNorm statistics of the batch u (flow space) at every layer, no dropout."""
    return ibinn.ibinn_forward(flow_params, config, u, train=True, dropout=False)[2]


def refresh_batch_stats(params: dict, config: FlowClassifierConfig, x: jax.Array, key: jax.Array) -> dict:
    """IB-INN only: replace the BN running statistics by those of the (dequantised) batch x.

    With PyTorch momentum 0.999 the running statistics are those of the last training batch;
    one large batch gives the eval-mode network less noisy ones. Glow params pass through.
    """
    if not is_ibinn(config):
        return params
    u = to_flow_space(config, dequantize(key, config, jnp.asarray(x, jnp.float32)))[0]
    return dict(params, glow=dict(params["glow"], bn=_batch_stats(params["glow"], config.glow, u)))


def encode(params: dict, config: FlowClassifierConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, H, W, C) in [0, 1] -> (z (B, D), log|det dz/dx| (B,)) (eval mode)."""
    u, ld_pre = to_flow_space(config, x)
    if is_ibinn(config):
        z, logdet, _ = ibinn.ibinn_forward(params["glow"], cast(IBINNConfig, config.glow), u)
    else:
        z, logdet = glow_forward(params["glow"], cast(GlowConfig, config.glow), u)
    return z, logdet + ld_pre


def encode_train(params: dict, config: FlowClassifierConfig, x: jax.Array, key: jax.Array):
    """Training-mode encode: (z, logdet, new flow params) — IB-INN updates its BN statistics and
    applies dropout (keyed by ``key``); Glow is the same as :func:`encode`."""
    u, ld_pre = to_flow_space(config, x)
    if is_ibinn(config):
        z, logdet, bn = ibinn.ibinn_forward(params["glow"], cast(IBINNConfig, config.glow), u, train=True, key=key)
        return z, logdet + ld_pre, dict(params["glow"], bn=bn)
    z, logdet = glow_forward(params["glow"], cast(GlowConfig, config.glow), u)
    return z, logdet + ld_pre, params["glow"]


def decode(params: dict, config: FlowClassifierConfig, z: jax.Array) -> jax.Array:
    """z (B, D) -> x (B, H, W, C), nominally in [0, 1] (not clipped)."""
    if is_ibinn(config):
        return from_flow_space(config, ibinn.ibinn_inverse(params["glow"], cast(IBINNConfig, config.glow), z))
    return from_flow_space(config, glow_inverse(params["glow"], cast(GlowConfig, config.glow), z))


def class_logits(params: dict, config: FlowClassifierConfig, x: jax.Array) -> jax.Array:
    """Unnormalised log p(y|x): (B, H, W, C) -> (B, C)."""
    z, _ = encode(params, config, x)
    return latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test)


def predict_proba(params: dict, config: FlowClassifierConfig, x: jax.Array) -> jax.Array:
    return jax.nn.softmax(class_logits(params, config, x), axis=-1)


def dequantize(key: jax.Array, config: FlowClassifierConfig, x: jax.Array) -> jax.Array:
    """Training-time input noise: x + U(0, 1/bins) + sigma N(0, 1).

    ``config.noise_boundary``: "reflect" folds the result back into [0, 1] (the logit map needs
    it there; reflection, not clipping, which would put point masses at 0 and 1 that a flow
    could exploit for unbounded likelihood). "none" leaves it as it is, as the IB-INN authors'
    data pipeline does: on MNIST, where most pixels are exactly 0 or 1, folding gives the noisy
    density a hard wall at both ends of the range, which a flow can only fit with very steep maps
    there (see README, "Which differences mattered").
    """
    ku, kn = jax.random.split(key)
    u = jax.random.uniform(ku, x.shape, minval=0.0, maxval=1.0 / config.dequantize_bins)
    y = x + u + config.noise_sigma * jax.random.normal(kn, x.shape)
    if config.noise_boundary == "none":
        return y
    y = jnp.abs(y)
    return 1.0 - jnp.abs(1.0 - y)


def loss_fn(params: dict, config: FlowClassifierConfig, x: jax.Array, labels: jax.Array, key: jax.Array):
    """IB-INN training loss on a batch: x (B, H, W, C) in [0, 1], labels (B,).

    ``aux["flow"]`` holds the flow parameters after the training-mode pass (new BN statistics for
    the IB-INN network); the trainer writes them back after the gradient step."""
    # Glow has no dropout: its dequantisation noise keeps using ``key`` itself.
    k_noise, k_drop = jax.random.split(key) if is_ibinn(config) else (key, key)
    z, logdet, flow = encode_train(params, config, dequantize(k_noise, config, x), k_drop)
    loss, aux = latent_lib.ib_loss(params["latent"], config.latent, z, logdet, labels)
    aux["flow"] = flow
    aux["bpd"] = jnp.mean(latent_lib.bits_per_dim(aux.pop("nll_per_dim"), config.dequantize_bins))
    return loss, aux


def nll_bits_per_dim(params: dict, config: FlowClassifierConfig, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Bits/dim of each image under the flow (B,) (uniform dequantisation when ``key`` is given)."""
    if key is not None:
        x = x + jax.random.uniform(key, x.shape, maxval=1.0 / config.dequantize_bins)
    z, logdet = encode(params, config, x)
    nll = -latent_lib.log_p_x(params["latent"], z, logdet) / config.latent_dim
    return latent_lib.bits_per_dim(nll, config.dequantize_bins)
