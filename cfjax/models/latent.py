"""Class-conditional Gaussians in latent space: the IB-INN generative classifier.

z | y ~ N(mu_y, I) over the whole flattened latent (D dims), class prior w = softmax(phi).

    log p(z|y)   = -1/2 ||z - mu_y||^2 - D/2 log(2 pi)
    log p(y|x)   = log_softmax_y(-1/2 ||z - mu_y||^2 + log w_y)
    L_X          = (-logsumexp_y(-1/2 ||z - mu_y||^2 + log w_y) + D/2 log 2pi - log|det J|) / D
    L_Y          = sum_y ytilde_y (log_softmax_y(...) - log w_y)          (log w as a constant)
    loss         = 2/(1+beta) L_X - 2 beta/(1+beta) L_Y

(Ardizzone et al., NeurIPS 2020; the constant D/2 log 2pi is included so that L_X is an honest
negative log-likelihood in nats per dimension and bits/dim can be reported from it.)

Parameters are a dict ``{"mu": (C, D), "logit_prior": (C,)}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError
from cfjax.validation import positive_float


@dataclass(frozen=True)
class LatentConfig:
    num_classes: int = 10
    beta: float = 1.0            # IB trade-off: larger = more weight on classification (L_Y)
    label_smoothing: float = 0.05
    mu_init_distance: float = 5.0  # expected distance between initial class means
    train_prior: bool = False    # learn the class prior logits (mnist5k is balanced)
    use_prior_at_test: bool = False

    def __post_init__(self):
        if self.num_classes < 2:
            raise CfjaxError(f"LatentConfig.num_classes must be >= 2, got {self.num_classes}")
        positive_float(self.beta, "LatentConfig.beta")
        if not 0 <= self.label_smoothing < 1:
            raise CfjaxError(f"LatentConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatentConfig":
        return cls(**d)


def init_latent(key: jax.Array, config: LatentConfig, dim: int) -> dict:
    """Class means drawn so that ||mu_i - mu_j|| is about ``mu_init_distance``; uniform prior."""
    mu = jax.random.normal(key, (config.num_classes, dim)) * (config.mu_init_distance / math.sqrt(2 * dim))
    return {"mu": mu, "logit_prior": jnp.zeros((config.num_classes,))}


def log_prior(params: dict) -> jax.Array:
    """log w: (C,)"""
    return jax.nn.log_softmax(params["logit_prior"])


def squared_distances(params: dict, z: jax.Array) -> jax.Array:
    """||z - mu_y||^2 for every class: z (B, D) -> (B, C)."""
    mu = params["mu"]
    # Expanded form is one matmul; clamp tiny negatives from cancellation.
    d2 = jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ mu.T + jnp.sum(mu * mu, -1)[None, :]
    return jnp.maximum(d2, 0.0)


def log_p_z_given_y(params: dict, z: jax.Array) -> jax.Array:
    """log N(z; mu_y, I) for every class: (B, D) -> (B, C)."""
    dim = z.shape[-1]
    return -0.5 * squared_distances(params, z) - 0.5 * dim * math.log(2 * math.pi)


def class_logits(params: dict, z: jax.Array, use_prior: bool = True) -> jax.Array:
    """Unnormalised log p(y|x): -1/2 ||z - mu_y||^2 (+ log w_y). (B, D) -> (B, C)."""
    logits = -0.5 * squared_distances(params, z)
    if use_prior:
        logits = logits + log_prior(params)[None, :]
    return logits


def log_p_y_given_x(params: dict, z: jax.Array, use_prior: bool = True) -> jax.Array:
    """Bayes classifier log p(y|x) from the latent: (B, D) -> (B, C)."""
    return jax.nn.log_softmax(class_logits(params, z, use_prior), axis=-1)


def log_p_x(params: dict, z: jax.Array, logdet: jax.Array) -> jax.Array:
    """log p(x) = logsumexp_y(log p(z|y) + log w_y) + log|det J|: (B,) in nats."""
    return jax.nn.logsumexp(log_p_z_given_y(params, z) + log_prior(params)[None, :], axis=-1) + logdet


def ib_loss(params: dict, config: LatentConfig, z: jax.Array, logdet: jax.Array, labels: jax.Array):
    """IB-INN loss. z (B, D), logdet (B,), labels (B,) int -> (loss scalar, aux dict of (B,)/scalars)."""
    dim = z.shape[-1]
    lp = log_prior(params)
    if not config.train_prior:
        lp = jax.lax.stop_gradient(lp)
    logits = -0.5 * squared_distances(params, z) + lp[None, :]
    l_x = (-(jax.nn.logsumexp(logits, -1) - 0.5 * dim * math.log(2 * math.pi)) - logdet) / dim
    onehot = jax.nn.one_hot(labels, config.num_classes)
    smooth = onehot * (1 - config.label_smoothing) + config.label_smoothing / config.num_classes
    l_y = jnp.sum(smooth * (jax.nn.log_softmax(logits, -1) - jax.lax.stop_gradient(lp)[None, :]), -1)
    beta = config.beta
    loss = jnp.mean(2.0 / (1 + beta) * l_x - 2.0 * beta / (1 + beta) * l_y)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"l_x": jnp.mean(l_x), "l_y": jnp.mean(l_y), "acc": acc, "nll_per_dim": l_x}


def bits_per_dim(nll_per_dim_nats: jax.Array, num_bins: int = 256) -> jax.Array:
    """Bits/dim of 8-bit data from the NLL (nats per dim) of the dequantised input in [0, 1].

    A bin of width 1/num_bins has probability density * (1/num_bins), so the discrete NLL per
    dimension is nll + log(num_bins) nats.
    """
    return (nll_per_dim_nats + math.log(num_bins)) / math.log(2.0)
