"""DUQ: Deterministic Uncertainty Quantification (van Amersfoort et al., ICML 2020).

DISC uses DUQ as its manifold-consistency model: ``K_c(x)`` in [0, 1] says how close image ``x``
lies to class ``c``'s centroid in a learnt embedding; 1 = certain, ~0 = off the data manifold.

Model::

    f(x)            feature extractor, (B, H, W, C) -> (B, F)
    z_c(x) = W_c f(x)                          W: (C, E, F), per-class projections
    e_c    = m_c / n_c                         centroids, exponential moving averages (gamma)
    K_c(x) = exp(-mean_j (z_c(x) - e_c)_j^2 / (2 sigma^2))
    loss   = BCE(K(x), onehot(y)) + lambda_gp * mean_b (||grad_x sum_c K_c(x_b)||_2 - 1)^2

The BCE is averaged over examples and classes, the gradient penalty is two-sided and computed
per example (the paper's setting). After each optimiser step the centroids are updated with the
new weights: ``n_c <- gamma n_c + (1 - gamma) #{b: y_b = c}``,
``m_c <- gamma m_c + (1 - gamma) sum_{b: y_b = c} z_c(x_b)``.

Feature extractor: conv3x3(w)-ReLU-maxpool2, conv3x3(2w)-ReLU-maxpool2, conv3x3(2w)-ReLU-maxpool2,
flatten, dense(F)-ReLU. It has **no BatchNorm** on purpose: ``K(x)`` is then a function of the
single image ``x`` (no batch coupling), which the per-example gradient penalty and DISC's
``L_mc`` both need, and the model has no train/eval modes.

Variables (a plain dict pytree)::

    {'params':    {'features': <flax params>, 'W': (C, E, F)},     trained by the optimiser
     'centroids': {'sums': (C, E), 'counts': (C,)}}                EMA state, never differentiated

Initialisation (as the authors' code): ``counts = 13``, ``sums = 13 * normal(0, 0.05)``.

Public API::

    DUQConfig(...)                                           frozen; to_dict/from_dict
    init_duq(key, config) -> variables
    duq_embed(variables, config, x) -> z (B, C, E)
    duq_log_kernel(variables, config, x) -> log K (B, C)     (stable; DISC's -log K_y'(x))
    duq_kernel(variables, config, x) -> K (B, C) in [0, 1]
    duq_input_gradient_norm(variables, config, x) -> (B,)    ||grad_x sum_c K_c(x)||_2
    duq_loss(variables, config, x, y) -> (loss, aux)         differentiate w.r.t. variables['params']
    update_centroids(variables, config, x, y) -> variables   the EMA step
    centroids(variables) -> e (C, E)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError
from cfjax.validation import non_negative_float, positive_float
from cfjax.models.classifier import max_pool_2x2


@dataclass(frozen=True)
class DUQConfig:
    num_classes: int = 10
    image_shape: tuple[int, ...] = (28, 28, 1)
    width: int = 32               # channels of the first conv; the next two have 2 * width
    feature_dim: int = 128        # F
    embed_dim: int = 64           # E
    sigma: float = 0.1            # kernel length scale
    gamma: float = 0.999          # centroid EMA decay
    lambda_gp: float = 0.75       # gradient-penalty weight
    centroid_init_std: float = 0.05
    centroid_init_count: float = 13.0

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise CfjaxError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        for name in ("num_classes", "width", "feature_dim", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "num_classes" else 1):
                raise CfjaxError(f"DUQ {name} must be a positive integer{' >= 2' if name == 'num_classes' else ''}, got {v!r}")
        positive_float(self.sigma, "DUQ sigma")
        if not 0.0 <= self.gamma < 1.0:
            raise CfjaxError(f"DUQ gamma must lie in [0, 1), got {self.gamma}")
        non_negative_float(self.lambda_gp, "DUQ lambda_gp")
        if not self.centroid_init_count > 0 or self.centroid_init_std < 0:
            raise CfjaxError("DUQ centroid_init_count must be positive and centroid_init_std >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DUQConfig":
        if not isinstance(d, dict):
            raise CfjaxError(f"not a DUQ config (expected a dict, got {type(d).__name__})")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CfjaxError(f"not a DUQ config (unknown fields {sorted(unknown)})")
        try:
            return cls(**{**d, "image_shape": tuple(d.get("image_shape", (28, 28, 1)))})
        except TypeError as e:
            raise CfjaxError(f"not a DUQ config ({e})") from e


class DUQFeatures(nn.Module):
    """f(x): (B, H, W, C) -> (B, F); no BatchNorm (see the module docstring)."""

    width: int
    feature_dim: int

    @nn.compact
    def __call__(self, x):
        for i, feats in enumerate((self.width, 2 * self.width, 2 * self.width), start=1):
            x = nn.relu(nn.Conv(feats, (3, 3), name=f"conv{i}")(x))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.feature_dim, name="fc")(x))


def _features_module(config: DUQConfig) -> DUQFeatures:
    return DUQFeatures(config.width, config.feature_dim)


def init_duq(key: jax.Array, config: DUQConfig) -> dict:
    """Fresh DUQ variables ``{'params': {'features', 'W'}, 'centroids': {'sums', 'counts'}}``."""
    k_f, k_w, k_m = jax.random.split(key, 3)
    x = jnp.zeros((1, *config.image_shape), jnp.float32)
    features = _features_module(config).init(k_f, x)["params"]
    c, e, f = config.num_classes, config.embed_dim, config.feature_dim
    # He-normal over the feature axis: z_c keeps the scale of f.
    w = jax.random.normal(k_w, (c, e, f), jnp.float32) * jnp.sqrt(2.0 / f)
    n0 = config.centroid_init_count
    sums = n0 * config.centroid_init_std * jax.random.normal(k_m, (c, e), jnp.float32)
    counts = jnp.full((c,), n0, jnp.float32)
    return {"params": {"features": features, "W": w}, "centroids": {"sums": sums, "counts": counts}}


def duq_features(variables: dict, config: DUQConfig, x: jax.Array) -> jax.Array:
    """f(x): (B, H, W, C) -> (B, F)."""
    return _features_module(config).apply({"params": variables["params"]["features"]}, x)  # type: ignore[return-value]


def duq_embed(variables: dict, config: DUQConfig, x: jax.Array) -> jax.Array:
    """Per-class embeddings z_c(x) = W_c f(x): (B, H, W, C) -> (B, C, E)."""
    f = duq_features(variables, config, x)
    return jnp.einsum("cef,bf->bce", variables["params"]["W"], f)


def centroids(variables: dict) -> jax.Array:
    """e_c = m_c / n_c, (C, E)."""
    cen = variables["centroids"]
    return cen["sums"] / cen["counts"][:, None]


def duq_log_kernel(variables: dict, config: DUQConfig, x: jax.Array) -> jax.Array:
    """log K_c(x) = -mean_j (z_c(x) - e_c)_j^2 / (2 sigma^2), (B, C); exact, never -inf."""
    z = duq_embed(variables, config, x)
    e = jax.lax.stop_gradient(centroids(variables))
    d = jnp.mean((z - e[None]) ** 2, axis=-1)
    return -d / (2.0 * config.sigma**2)


def duq_kernel(variables: dict, config: DUQConfig, x: jax.Array) -> jax.Array:
    """K_c(x) in [0, 1], (B, C); 1 = x sits on class c's centroid."""
    return jnp.exp(duq_log_kernel(variables, config, x))


def duq_input_gradient_norm(variables: dict, config: DUQConfig, x: jax.Array) -> jax.Array:
    """||grad_x sum_c K_c(x_b)||_2 per example, (B,). Examples are independent (no BatchNorm)."""
    g = jax.grad(lambda xx: jnp.sum(duq_kernel(variables, config, xx)))(x)
    sq = jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=-1)
    # sqrt'(0) is infinite: the tiny floor keeps second derivatives finite at a zero gradient.
    return jnp.sqrt(sq + 1e-12)


def _binary_cross_entropy(log_k: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean BCE(K, targets) computed from log K.

    log K is exact (never -inf), so the positive term keeps its gradient however far x is from
    the centroid; log(1 - K) is floored at -100 (as torch's BCELoss) only where K rounds to 1.
    """
    log_p = log_k
    one_minus = -jnp.expm1(log_k)                       # 1 - K, accurate for K near 1
    safe = jnp.where(one_minus > 0, one_minus, 1.0)
    log_q = jnp.where(one_minus > 0, jnp.maximum(jnp.log(safe), -100.0), -100.0)
    return -jnp.mean(targets * log_p + (1.0 - targets) * log_q)


def duq_loss(variables: dict, config: DUQConfig, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
    """DUQ training loss and diagnostics.

    x: (B, H, W, C), y: (B,) int. Returns (loss, {'bce', 'gp', 'acc', 'grad_norm'}): loss =
    BCE(K(x), onehot(y)) + lambda_gp * mean_b (||grad_x sum_c K_c(x_b)||_2 - 1)^2. Take the
    gradient with respect to ``variables['params']`` (the centroids enter as constants).
    """
    log_k = duq_log_kernel(variables, config, x)
    onehot = jax.nn.one_hot(y, config.num_classes, dtype=log_k.dtype)
    bce = _binary_cross_entropy(log_k, onehot)
    if config.lambda_gp > 0:
        gnorm = duq_input_gradient_norm(variables, config, x)
        gp = jnp.mean((gnorm - 1.0) ** 2)
    else:
        gnorm = jnp.zeros(x.shape[:1], log_k.dtype)
        gp = jnp.zeros((), log_k.dtype)
    loss = bce + config.lambda_gp * gp
    acc = jnp.mean(jnp.argmax(log_k, -1) == y)
    return loss, {"bce": bce, "gp": gp, "acc": acc, "grad_norm": jnp.mean(gnorm)}


def update_centroids(variables: dict, config: DUQConfig, x: jax.Array, y: jax.Array) -> dict:
    """One EMA step of the centroid sums and counts on the batch (x (B, H, W, C), y (B,))."""
    z = jax.lax.stop_gradient(duq_embed(variables, config, x))
    onehot = jax.nn.one_hot(y, config.num_classes, dtype=z.dtype)
    g = config.gamma
    cen = variables["centroids"]
    counts = g * cen["counts"] + (1.0 - g) * jnp.sum(onehot, axis=0)
    sums = g * cen["sums"] + (1.0 - g) * jnp.einsum("bc,bce->ce", onehot, z)
    return {**variables, "centroids": {"sums": sums, "counts": counts}}


def duq_predict(variables: dict, config: DUQConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(argmax_c K_c(x) (B,), max_c K_c(x) (B,)): the class and its certainty."""
    k = duq_kernel(variables, config, x)
    return jnp.argmax(k, -1), jnp.max(k, -1)
