"""Invertibility, log-determinants (against jacfwd) and config validation of the Glow layers/network."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.errors import CfjaxError
from cfjax.models.flows import actnorm, conv1x1, coupling, reshape, split
from cfjax.models.glow import GlowConfig, glow_forward, glow_inverse, init_glow, num_params


def _perturb(params, key, scale=0.05):
    """Add N(0, scale^2) noise to every leaf (numpy RNG: eager jax.random is slow to compile per shape)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    return jax.tree_util.tree_map(
        lambda l: jnp.asarray(np.asarray(l) + scale * rng.standard_normal(l.shape).astype(np.float32)), params
    )


def _jac_logdet(fn, x):
    """slogdet of the Jacobian of the flattened per-example map at x (H, W, C)."""
    flat = lambda v: fn(v.reshape((1,) + x.shape))[0].reshape(-1)  # noqa: E731
    jac = jax.jacfwd(flat)(x.reshape(-1))
    sign, ld = jnp.linalg.slogdet(jac)
    assert float(sign) != 0.0
    return float(ld)


def _layers(key, c=2, hidden=8):
    """(name, forward(x)->(y, ld), inverse(y)->(x, ld)) for each layer, with perturbed params."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x0 = jax.random.normal(k1, (5, 4, 4, c)) * 2.0 + 0.5
    an = _perturb(actnorm.init(x0), k4)
    cv = _perturb(conv1x1.init(k2, c), k4)
    cp = _perturb(coupling.init(k3, c, hidden), k4, 0.2)
    return [
        ("actnorm", lambda x: actnorm.forward(an, x), lambda y: actnorm.inverse(an, y)),
        ("conv1x1", lambda x: conv1x1.forward(cv, x), lambda y: conv1x1.inverse(cv, y)),
        ("coupling", lambda x: coupling.forward(cp, x, 2.0), lambda y: coupling.inverse(cp, y, 2.0)),
        ("coupling_clamp1", lambda x: coupling.forward(cp, x, 1.0), lambda y: coupling.inverse(cp, y, 1.0)),
        ("haar", reshape.haar_forward, reshape.haar_inverse),
        ("squeeze", reshape.squeeze_forward, reshape.squeeze_inverse),
    ]


@pytest.mark.parametrize("idx", range(6))
def test_layer_invertible_and_logdet(idx):
    name, fwd, inv = _layers(jax.random.PRNGKey(0))[idx]
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2))
    y, ld = fwd(x)
    assert ld.shape == (3,)
    xr, ld_inv = inv(y)
    assert xr.shape == x.shape
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), atol=1e-4, rtol=1e-5, err_msg=name)
    # log-det against an independent Jacobian computation, per example
    for i in range(2):
        np.testing.assert_allclose(_jac_logdet(fwd, x[i]), float(ld[i]), atol=1e-3, rtol=1e-4, err_msg=name)
    if name.startswith("coupling"):
        assert float(jnp.max(jnp.abs(y - x))) > 1e-3, "perturbed coupling should not be the identity"


def test_coupling_starts_as_identity_and_soft_clamp():
    p = coupling.init(jax.random.PRNGKey(0), 4, 8)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    y, ld = coupling.forward(p, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=0)
    np.testing.assert_allclose(np.asarray(ld), 0.0, atol=0)
    p["conv3"]["b"] = p["conv3"]["b"].at[2:].set(1e3)  # huge raw scale -> |s| < clamp
    _, ld = coupling.forward(p, x, 2.0)
    assert np.all(np.asarray(ld) < 2.0 * 2 * 16)


def test_haar_is_orthonormal_and_squeeze_layout():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
    y, _ = reshape.haar_forward(x)
    assert y.shape == (2, 2, 3, 12)
    np.testing.assert_allclose(float(jnp.sum(y**2)), float(jnp.sum(x**2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y[..., :3]), np.asarray(0.5 * (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2])), atol=1e-6)
    s = reshape.squeeze(x)
    np.testing.assert_array_equal(np.asarray(s[:, 1, 2, 3:6]), np.asarray(x[:, 2, 5]))  # dy=0, dx=1
    np.testing.assert_array_equal(np.asarray(reshape.unsqueeze(s)), np.asarray(x))
    with pytest.raises(CfjaxError):
        reshape.haar_forward(jnp.zeros((1, 5, 4, 1)))
    with pytest.raises(CfjaxError):
        reshape.squeeze(jnp.zeros((1, 4, 3, 1)))


def test_split_roundtrip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))
    a, b = split.split_forward(x)
    assert a.shape == b.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(np.asarray(split.split_inverse(a, b)), np.asarray(x))


def test_actnorm_data_dependent_init():
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 6, 6, 3)) * jnp.array([0.1, 3.0, 10.0]) + jnp.array([5.0, -2.0, 0.0])
    y, _ = actnorm.forward(actnorm.init(x), x)
    np.testing.assert_allclose(np.asarray(jnp.mean(y, axis=(0, 1, 2))), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jnp.std(y, axis=(0, 1, 2))), 1.0, atol=1e-3)


def test_conv1x1_init_is_rotation():
    p = conv1x1.init(jax.random.PRNGKey(3), 6)
    w = conv1x1.weight(p)
    np.testing.assert_allclose(np.asarray(w @ w.T), np.eye(6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(conv1x1.inverse_weight(p) @ w), np.eye(6), atol=1e-5)


def _small_glow(downsample, use_split, image_shape=(8, 8, 1), steps=2):
    cfg = GlowConfig(image_shape=image_shape, num_levels=2, steps_per_level=steps, hidden_channels=8,
                     max_hidden_channels=16, downsample=downsample, split=use_split)
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (16,) + image_shape)
    params = _perturb(init_glow(jax.random.PRNGKey(1), cfg, x0), jax.random.PRNGKey(2))
    return cfg, params


@pytest.mark.parametrize("downsample,use_split", [("haar", False), ("haar", True), ("squeeze", False), ("squeeze", True)])
def test_glow_logdet_matches_jacobian(downsample, use_split):
    cfg, params = _small_glow(downsample, use_split)
    x = jax.random.uniform(jax.random.PRNGKey(5), (2, 8, 8, 1))

    @jax.jit
    def check(params, x):  # one compile per config
        z, ld = glow_forward(params, cfg, x)
        xr = glow_inverse(params, cfg, z)
        flat = lambda v: glow_forward(params, cfg, v.reshape(1, 8, 8, 1))[0][0]  # noqa: E731
        sign, ref = jnp.linalg.slogdet(jax.jacfwd(flat)(x[0].reshape(-1)))
        return z, ld, xr, sign, ref

    z, ld, xr, sign, ref = check(params, x)
    assert z.shape == (2, 64) and ld.shape == (2,)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x), atol=1e-4)
    assert float(sign) != 0.0
    np.testing.assert_allclose(float(ref), float(ld[0]), atol=1e-3, rtol=1e-4)
    if downsample == "squeeze" and use_split:  # also usable as jax.jit(glow_forward, static_argnums=1)
        z2, _ = jax.jit(glow_forward, static_argnums=1)(params, cfg, x)
        np.testing.assert_allclose(np.asarray(z2), np.asarray(z), atol=1e-5)


def test_glow_split_latent_ordering():
    cfg, params = _small_glow("haar", True, (8, 8, 2), steps=1)
    x = jax.random.uniform(jax.random.PRNGKey(5), (3, 8, 8, 2))
    z = jax.jit(glow_forward, static_argnums=1)(params, cfg, x)[0]
    assert z.shape == (3, cfg.latent_dim) == (3, 128)
    # level 0 is (4, 4, 8): its factored-out half (4, 4, 4) is the first 64 latent entries, i.e. the
    # second channel half of the level-0 output; re-running level 0 alone must reproduce them.
    from cfjax.models.flows import reshape as rs
    from cfjax.models.glow import _step_forward

    h, _ = rs.haar_forward(x)
    p0 = jax.tree_util.tree_map(lambda a: a[0], params["level0"])
    h, _ = _step_forward(p0, h, cfg.coupling_clamp)
    np.testing.assert_allclose(np.asarray(z[:, :64]), np.asarray(h[..., 4:].reshape(3, -1)), atol=1e-5)
    xr = jax.jit(glow_inverse, static_argnums=1)(params, cfg, z)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x), atol=1e-4)


@pytest.mark.slow  # moved out of the default suite for time; run with -m slow
def test_glow_default_invertible_and_vmap():
    cfg = GlowConfig()
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (32, 28, 28, 1))
    params0 = init_glow(jax.random.PRNGKey(1), cfg, x0)
    # small noise: 16 perturbed steps of width 64-128 already change z a lot (0.02 makes it blow up)
    params = _perturb(params0, jax.random.PRNGKey(2), 0.005)
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 28, 28, 1))
    # eager (not jitted): compiling the 16-step network three times would dominate the test time
    z, ld = glow_forward(params, cfg, x)
    assert z.shape == (4, 784) and np.all(np.isfinite(np.asarray(ld)))
    assert float(jnp.max(jnp.abs(z - glow_forward(params0, cfg, x)[0]))) > 0.1  # couplings are not identity
    xr = glow_inverse(params, cfg, z)
    assert float(jnp.max(jnp.abs(xr - x))) <= 1e-4

    def one(xi):
        zi, ldi = glow_forward(params, cfg, xi[None])
        return zi[0], ldi[0]

    zv, ldv = jax.vmap(one)(x)
    np.testing.assert_allclose(np.asarray(zv), np.asarray(z), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ldv), np.asarray(ld), rtol=1e-5, atol=1e-3)
    assert num_params(params) > 0


def test_glow_other_image_shape():
    cfg = GlowConfig(image_shape=(32, 32, 3), num_levels=2, steps_per_level=1, hidden_channels=4, split=True)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = _perturb(init_glow(jax.random.PRNGKey(1), cfg, x), jax.random.PRNGKey(2))
    z, _ = jax.jit(glow_forward, static_argnums=1)(params, cfg, x)
    assert z.shape == (2, 3072)
    assert num_params(init_glow(jax.random.PRNGKey(1), cfg, x)) == num_params(params)
    np.testing.assert_array_equal(  # init is deterministic given the key
        np.asarray(init_glow(jax.random.PRNGKey(1), cfg, x)["level1"]["conv1x1"]["lower"]),
        np.asarray(init_glow(jax.random.PRNGKey(1), cfg, x)["level1"]["conv1x1"]["lower"]),
    )
    xr = jax.jit(glow_inverse, static_argnums=1)(params, cfg, z)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x), atol=1e-4)


def test_config_roundtrip_and_hashable():
    cfg = GlowConfig(image_shape=[8, 8, 2], num_levels=3, split=True, downsample="squeeze")
    assert cfg.image_shape == (8, 8, 2) and cfg.latent_dim == 128
    d = cfg.to_dict()
    assert isinstance(d["image_shape"], list)
    assert GlowConfig.from_dict(d) == cfg and hash(GlowConfig.from_dict(d)) == hash(cfg)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"downsample": "bogus"}, "downsample"),
        ({"num_levels": 0}, "num_levels"),
        ({"steps_per_level": -1}, "steps_per_level"),
        ({"hidden_channels": 2.5}, "hidden_channels"),
        ({"max_hidden_channels": 0}, "max_hidden_channels"),
        ({"coupling_clamp": 0.0}, "coupling_clamp"),
        ({"image_shape": (28, 28)}, "image_shape"),
        ({"image_shape": (28, 28, 1), "num_levels": 3}, "image_shape"),
        ({"split": "yes"}, "split"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(CfjaxError, match=field):
        GlowConfig(**kwargs)


def test_bad_input_shapes():
    cfg = GlowConfig(image_shape=(8, 8, 1), steps_per_level=1, hidden_channels=4)
    params = init_glow(jax.random.PRNGKey(0), cfg, jnp.ones((2, 8, 8, 1)))
    with pytest.raises(CfjaxError):
        glow_forward(params, cfg, jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(CfjaxError):
        glow_inverse(params, cfg, jnp.zeros((1, 63)))
    with pytest.raises(CfjaxError):
        GlowConfig.from_dict({"nonsense": 1})
