import math

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.models import latent as L


def _np_logsumexp(a, axis=-1):
    m = a.max(axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis, keepdims=True))).squeeze(axis)


def test_gaussian_terms_against_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7)).astype(np.float32)
    mu = rng.normal(size=(3, 7)).astype(np.float32)
    phi = rng.normal(size=3).astype(np.float32)
    p = {"mu": jnp.asarray(mu), "logit_prior": jnp.asarray(phi)}
    d2 = ((z[:, None, :] - mu[None]) ** 2).sum(-1)
    np.testing.assert_allclose(L.squared_distances(p, jnp.asarray(z)), d2, rtol=1e-5, atol=1e-4)
    logn = -0.5 * d2 - 3.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(L.log_p_z_given_y(p, jnp.asarray(z)), logn, rtol=1e-5, atol=1e-4)
    logw = phi - _np_logsumexp(phi)
    a = -0.5 * d2 + logw
    np.testing.assert_allclose(L.log_p_y_given_x(p, jnp.asarray(z)), a - _np_logsumexp(a)[:, None], rtol=1e-5, atol=1e-4)
    logdet = rng.normal(size=5).astype(np.float32)
    np.testing.assert_allclose(L.log_p_x(p, jnp.asarray(z), jnp.asarray(logdet)), _np_logsumexp(logn + logw) + logdet, rtol=1e-5, atol=1e-4)


def test_ib_loss_against_numpy():
    rng = np.random.default_rng(1)
    cfg = L.LatentConfig(num_classes=3, beta=2.0, label_smoothing=0.1)
    z = rng.normal(size=(4, 6)).astype(np.float32)
    mu = rng.normal(size=(3, 6)).astype(np.float32)
    logdet = rng.normal(size=4).astype(np.float32)
    y = np.array([0, 2, 1, 2])
    p = {"mu": jnp.asarray(mu), "logit_prior": jnp.zeros(3)}
    loss, aux = L.ib_loss(p, cfg, jnp.asarray(z), jnp.asarray(logdet), jnp.asarray(y))
    d2 = ((z[:, None, :] - mu[None]) ** 2).sum(-1)
    logw = np.log(np.full(3, 1 / 3))
    a = -0.5 * d2 + logw
    lx = (-(_np_logsumexp(a) - 3 * math.log(2 * math.pi)) - logdet) / 6
    onehot = np.eye(3)[y] * 0.9 + 0.1 / 3
    ly = (onehot * (a - _np_logsumexp(a)[:, None] - logw)).sum(-1)
    want = np.mean(2 / 3 * lx - 4 / 3 * ly)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["acc"]), np.mean(a.argmax(-1) == y))


def test_init_means_are_about_the_configured_distance_apart():
    cfg = L.LatentConfig(num_classes=10, mu_init_distance=5.0)
    p = L.init_latent(jax.random.PRNGKey(0), cfg, 784)
    d = np.linalg.norm(np.asarray(p["mu"])[:, None] - np.asarray(p["mu"])[None], axis=-1)
    off = d[~np.eye(10, dtype=bool)]
    assert 4.0 < off.mean() < 6.0


def test_bits_per_dim_of_uniform_density_is_eight():
    # A uniform density on [0, 1]^D has NLL 0 nats/dim -> 8 bits/dim for 256 bins.
    np.testing.assert_allclose(float(L.bits_per_dim(jnp.array(0.0))), 8.0, rtol=1e-6)
