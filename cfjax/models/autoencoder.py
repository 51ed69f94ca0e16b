"""Convolutional autoencoders for the interpretability metrics IM1 and IM2.

Van Looveren & Klaise's IM1/IM2 (used by the ECINN authors' evaluation study) ask how well an
autoencoder trained on one class reconstructs a counterfactual: one autoencoder per class plus
one on all classes. cfjax trains its own (they are judges the explained models never saw)::

    fit_autoencoders(images, labels, num_classes, steps=600, seed=0) -> params  # stacked (C + 1, ...)
    count_of(params) -> num_classes + 1
    reconstruct(params, x, which) -> (N, H, W, C)  # autoencoder ``which[i]`` applied to ``x[i]``;
                                                   # which = num_classes is the all-class one

Architecture (28x28 grey images; any H, W divisible by 4): conv3x3(16, stride 2)-ReLU-conv3x3(16,
stride 2)-ReLU-conv3x3(1) (a 7x7x1 code: a narrow bottleneck keeps each class's autoencoder specific to its class) | nearest x2-conv3x3(16)-ReLU-nearest x2-conv3x3(8)-ReLU-
conv3x3(C) (linear output). Loss: mean squared error on [0, 1] pixels. The C + 1 autoencoders share one
architecture; their parameters are stacked on a leading axis.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfjax.errors import CfjaxError


class ConvAutoencoder(nn.Module):
    channels: int = 1
    code: int = 1

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        h = nn.relu(nn.Conv(16, (3, 3), strides=2)(h))
        h = nn.Conv(self.code, (3, 3))(h)
        for width in (16, 8):
            b, hh, ww, c = h.shape
            h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
            h = nn.relu(nn.Conv(width, (3, 3))(h))
        return nn.Conv(self.channels, (3, 3))(h)  # linear: a sigmoid here saturates on sparse digits


def _model(x_shape) -> ConvAutoencoder:
    if x_shape[-3] % 4 or x_shape[-2] % 4:
        raise CfjaxError(f"autoencoder images need height and width divisible by 4, got {tuple(x_shape[-3:])}")
    return ConvAutoencoder(channels=int(x_shape[-1]))


def fit_autoencoders(images, labels, num_classes: int, steps: int = 600, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0) -> dict:
    """Train one autoencoder per class and one on all images.

    images (N, H, W, C) float in [0, 1], labels (N,) int -> params pytree whose leaves have a
    leading axis of num_classes + 1 (index num_classes: the all-class autoencoder). Each
    autoencoder takes ``steps`` Adam steps on batches of its own images (drawn with replacement).
    The autoencoders are trained one after another with one compiled step (a ``vmap`` over
    stacked convolution weights becomes a grouped convolution, which XLA:CPU runs slowly).
    """
    x = np.asarray(images, np.float32)
    y = np.asarray(labels, np.int64)
    model = _model(x.shape)
    groups = [np.flatnonzero(y == c) for c in range(num_classes)] + [np.arange(len(x))]
    if any(len(g) == 0 for g in groups):
        raise CfjaxError("every class needs at least one image to train its autoencoder")
    opt = optax.adam(lr)

    def loss(p, xb):
        return jnp.mean((model.apply({"params": p}, xb) - xb) ** 2)

    @jax.jit
    def step(p, s, xb):
        g = jax.grad(loss)(p, xb)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(seed)
    trained = []
    for i, g in enumerate(groups):
        p = model.init(jax.random.PRNGKey(seed * 1000 + i), x[:1])["params"]
        s = opt.init(p)
        for _ in range(steps):
            p, s = step(p, s, jnp.asarray(x[g[rng.integers(0, len(g), batch_size)]]))
        trained.append(p)
    return jax.device_get(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trained))


def reconstruct(params, x, which, batch_size: int = 512) -> np.ndarray:
    """x (N, H, W, C) in [0, 1], which (N,) int in [0, num_classes] -> reconstructions (N, H, W, C).

    A ``which`` outside the stacked range gives NaN rows (never another class's answer)."""
    x = np.asarray(x, np.float32)
    which = np.asarray(which, np.int64)
    apply = _jitted_apply(_model(x.shape).channels)
    out = np.full_like(x, np.nan)
    for a in range(count_of(params)):
        idx = np.flatnonzero(which == a)
        p = jax.tree_util.tree_map(lambda leaf: leaf[a], params)
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            out[chunk] = np.asarray(apply(p, jnp.asarray(x[chunk])))
    return out


@functools.lru_cache(maxsize=None)
def _jitted_apply(channels: int):
    """One compiled forward pass per channel count, shared by every call of :func:`reconstruct`."""
    model = ConvAutoencoder(channels=channels)
    return jax.jit(lambda p, xb: model.apply({"params": p}, xb))


def count_of(params) -> int:
    """Number of stacked autoencoders in ``params`` (num_classes + 1)."""
    return int(jax.tree_util.tree_leaves(params)[0].shape[0])


def save(path, params) -> None:
    """Write stacked autoencoder params to ``path`` (msgpack bytes; atomic rename)."""
    import os

    from flax import serialization

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, params)))
    os.replace(tmp, path)


def load(path) -> dict:
    """Read params written by :func:`save`."""
    from flax import serialization

    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())
