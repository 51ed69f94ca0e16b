"""The IB-INN flow: each switch invertible with a log-determinant that matches jacfwd, train/eval
BatchNorm semantics against an independent NumPy computation, fixed transforms, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.errors import CfjaxError
from cfjax.models import flow_classifier as fc
from cfjax.models import ibinn
from cfjax.models.ibinn import IBINNConfig
from cfjax.models.latent import LatentConfig

SMALL = dict(image_shape=(8, 8, 1), blocks_high=2, blocks_low=2, width_high=4, width_low=8, dense_width=16)


def _perturbed(config, seed=0, scale=0.2):
    """Params with every weight and every BN statistic moved away from its init (so that the
    blocks are far from the identity and eval mode's statistics matter)."""
    p = ibinn.init_ibinn(jax.random.PRNGKey(seed), config)
    rng = np.random.default_rng(seed)
    net = jax.tree_util.tree_map(lambda a: a + scale * rng.standard_normal(a.shape).astype(np.float32), p["net"])
    bn = jax.tree_util.tree_map(lambda a: a + 0.3 * np.abs(rng.standard_normal(a.shape)).astype(np.float32), p["bn"])
    return {"net": net, "bn": bn}


def _jac_logdet(config, p, x):
    flat = lambda v: ibinn.ibinn_forward(p, config, v.reshape((1,) + x.shape))[0][0]  # noqa: E731
    sign, ld = jnp.linalg.slogdet(jax.jacfwd(flat)(x.reshape(-1)))
    assert float(sign) != 0.0
    return float(ld)


SLOW = pytest.mark.slow  # each case compiles a jacfwd; the default suite keeps two
SWITCHES = [
    {},
    {"batchnorm": False, "dense": False},
    pytest.param({"dense": False}, marks=SLOW),
    pytest.param({"mixing": "permutation"}, marks=SLOW),
    pytest.param({"block_scale": 1.0, "clamp": 1.0}, marks=SLOW),
    pytest.param({"blocks_high": 0, "blocks_low": 1}, marks=SLOW),
]


@pytest.mark.parametrize("switch", SWITCHES, ids=["default", "no-bn-no-dense", "no-dense", "permutation", "scale1", "no-high"])
def test_invertible_and_logdet_matches_jacobian(switch):
    config = IBINNConfig(**{**SMALL, **switch})
    p = _perturbed(config)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    z, ld, bn = ibinn.ibinn_forward(p, config, x)
    assert z.shape == (3, 64) and ld.shape == (3,)
    assert bn is p["bn"]  # eval mode leaves the statistics alone
    np.testing.assert_allclose(np.asarray(ibinn.ibinn_inverse(p, config, z)), np.asarray(x), atol=5e-4)
    for i in range(2):
        np.testing.assert_allclose(_jac_logdet(config, p, x[i]), float(ld[i]), rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("blocks", [(3, 2), (0, 1)])
def test_scanned_blocks_equal_the_unrolled_program(monkeypatch, blocks):
    """Eval-mode passes scan over the stacked blocks (SCAN_BLOCKS); the unrolled loop is the
    reference: the same z and x under jit, the log-determinant up to the order of its sum."""
    config = IBINNConfig(**{**SMALL, "blocks_high": blocks[0], "blocks_low": blocks[1]})
    p = _perturbed(config)
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 8, 8, 1))
    out = {}
    for scan in (True, False):
        monkeypatch.setattr(ibinn, "SCAN_BLOCKS", scan)
        # new functions each time: jit caches a trace per function, and the flag is read when tracing
        z, ld, _ = jax.jit(lambda p, x: ibinn.ibinn_forward(p, config, x))(p, x)
        xr = jax.jit(lambda p, z: ibinn.ibinn_inverse(p, config, z))(p, z + 0.1)  # off the data: any latent
        out[scan] = (np.asarray(z), np.asarray(ld), np.asarray(xr))
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out[True][2], out[False][2], rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # moved out of the default suite for time; run with -m slow
def test_full_mnist_preset_roundtrip_under_jit():
    config = IBINNConfig(blocks_high=3, blocks_low=3)
    p = _perturbed(config, scale=0.02)
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1)) * 2 - 1
    z, ld, _ = jax.jit(ibinn.ibinn_forward, static_argnums=1)(p, config, x)
    assert z.shape == (4, 784)
    xr = jax.jit(ibinn.ibinn_inverse, static_argnums=1)(p, config, z)
    np.testing.assert_allclose(np.asarray(xr), np.asarray(x), atol=2e-4)
    # the per-block fixed scale contributes exactly h*w*c*log(0.8) per block
    cfg1 = IBINNConfig(blocks_high=3, blocks_low=3, block_scale=1.0)
    _, ld1, _ = ibinn.ibinn_forward(p, cfg1, x)
    z8, _, _ = ibinn.ibinn_forward(p, config, x)
    assert np.all(np.isfinite(np.asarray(ld1))) and np.all(np.isfinite(np.asarray(z8)))


def test_dct_is_orthonormal_and_inverts():
    m = ibinn.dct_matrix(7)
    np.testing.assert_allclose(m @ m.T, np.eye(7), atol=1e-5)
    # against the textbook DCT-II of a 1-D signal
    x = np.random.default_rng(0).standard_normal(7)
    k = np.arange(7)
    ref = np.array([np.sum(x * np.cos(np.pi * (2 * k + 1) * kk / 14)) for kk in range(7)]) * np.sqrt(2 / 7)
    ref[0] /= np.sqrt(2)
    np.testing.assert_allclose(m @ x, ref, atol=1e-5)
    v = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 7, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(ibinn.dct_inverse(ibinn.dct_forward(v), (7, 7, 3))), np.asarray(v), atol=1e-5)


def test_fixed_mixings_are_rotations_and_deterministic():
    q = ibinn._mixings("orthogonal", 3, 0, 4, 16)
    for m in q:
        np.testing.assert_allclose(m @ m.T, np.eye(16), atol=1e-5)
        assert np.linalg.det(m) > 0
    np.testing.assert_array_equal(q, ibinn._mixings.__wrapped__("orthogonal", 3, 0, 4, 16))
    assert not np.allclose(q, ibinn._mixings("orthogonal", 4, 0, 4, 16))
    perm = ibinn._mixings("permutation", 0, 0, 2, 5)
    np.testing.assert_array_equal(perm.sum(1), np.ones((2, 5)))


def test_train_mode_batchnorm_against_numpy():
    """Train mode normalises by the batch; the new running statistics follow PyTorch's
    (1 - m) old + m batch with the unbiased variance; eval mode then uses them."""
    config = IBINNConfig(**{**SMALL, "dense": False, "blocks_low": 0, "blocks_high": 1, "bn_momentum": 0.9})
    p = _perturbed(config)
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 8, 8, 1))
    _, _, new = ibinn.ibinn_forward(p, config, x, train=True, dropout=False)
    # independent computation of the first BN's input: Haar, conditioning half, ReLU, conv1
    h = np.asarray(ibinn.reshape.haar_forward(x)[0])
    c = h.shape[-1]
    h1 = np.maximum(h[..., : c - c // 2], 0.0)
    w = np.asarray(p["net"]["high"]["conv1"][0])
    pad = np.pad(h1, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros(h1.shape[:3] + (w.shape[-1],))
    for di in range(3):
        for dj in range(3):
            conv += np.einsum("bhwc,co->bhwo", pad[:, di : di + h1.shape[1], dj : dj + h1.shape[2]], w[di, dj])
    mean = conv.mean((0, 1, 2))
    var = conv.var((0, 1, 2), ddof=1)
    old = p["bn"]["high"]["norm1"]
    np.testing.assert_allclose(np.asarray(new["high"]["norm1"]["mean"][0]), 0.1 * np.asarray(old["mean"][0]) + 0.9 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["high"]["norm1"]["var"][0]), 0.1 * np.asarray(old["var"][0]) + 0.9 * var, rtol=1e-4, atol=1e-5)
    # gradients never reach the statistics
    g = jax.grad(lambda bn: jnp.sum(ibinn.ibinn_forward({"net": p["net"], "bn": bn}, config, x, train=True)[0]))(p["bn"])
    assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree_util.tree_leaves(g))


def test_dropout_only_in_train_mode_with_a_key():
    config = IBINNConfig(**SMALL)
    p = _perturbed(config)
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 1))
    z_eval = ibinn.ibinn_forward(p, config, x)[0]
    z_a = ibinn.ibinn_forward(p, config, x, train=True, key=jax.random.PRNGKey(0))[0]
    z_b = ibinn.ibinn_forward(p, config, x, train=True, key=jax.random.PRNGKey(1))[0]
    z_nokey = ibinn.ibinn_forward(p, config, x, train=True)[0]
    z_nodrop = ibinn.ibinn_forward(p, config, x, train=True, key=jax.random.PRNGKey(0), dropout=False)[0]
    assert not np.allclose(z_a, z_b)
    np.testing.assert_allclose(np.asarray(z_nokey), np.asarray(z_nodrop), atol=1e-6)
    assert not np.allclose(z_eval, z_nokey)  # batch vs running statistics


def test_flow_classifier_bundle_with_ibinn_and_config_roundtrip():
    config = fc.FlowClassifierConfig(glow=IBINNConfig(**SMALL), latent=LatentConfig(beta=1.4265))
    d = config.to_dict()
    assert d["glow"]["arch"] == "ibinn"
    assert fc.FlowClassifierConfig.from_dict(d) == config
    x = jax.random.uniform(jax.random.PRNGKey(5), (16, 8, 8, 1))
    params = fc.init_flow_classifier(jax.random.PRNGKey(0), config, x)
    z, _ = fc.encode(params, config, x)
    np.testing.assert_allclose(np.asarray(fc.decode(params, config, z)), np.asarray(x), atol=1e-4)
    loss, aux = fc.loss_fn(params, config, x, jnp.arange(16) % 10, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)) and "bn" in aux["flow"]
    refreshed = fc.refresh_batch_stats(params, config, x, jax.random.PRNGKey(2))
    assert jax.tree_util.tree_structure(refreshed) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"image_shape": (10, 10, 1)}, "image_shape"), ({"blocks_high": -1}, "blocks_high"), ({"clamp": 0.0}, "clamp"),
     ({"dropout_low": 1.0}, "dropout_low"), ({"mixing": "lu"}, "mixing"), ({"bn_momentum": float("nan")}, "bn_momentum")],
)
def test_bad_config(kwargs, field):
    with pytest.raises(CfjaxError, match=field):
        IBINNConfig(**kwargs)


def test_bad_input_shapes():
    config = IBINNConfig(**SMALL)
    p = ibinn.init_ibinn(jax.random.PRNGKey(0), config)
    with pytest.raises(CfjaxError, match="expected shape"):
        ibinn.ibinn_forward(p, config, jnp.zeros((2, 9, 8, 1)))
    with pytest.raises(CfjaxError, match="expected z"):
        ibinn.ibinn_inverse(p, config, jnp.zeros((2, 63)))


def _np_conv3x3(x, w, stride=1):
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(x.shape[:3] + (w.shape[-1],))
    for di in range(3):
        for dj in range(3):
            out += np.einsum("bhwc,co->bhwo", pad[:, di : di + x.shape[1], dj : dj + x.shape[2]], w[di, dj])
    return out[:, ::stride, ::stride]


@pytest.mark.parametrize("stride", [1, 2])
def test_eval_subnet_against_numpy(stride):
    """Eval mode folds each BN into its convolution; the subnet must still equal the unfolded
    formula conv - (h - mean) / sqrt(var + eps) * scale + bias - ReLU ... computed in NumPy."""
    config = IBINNConfig(**SMALL)
    p = _perturbed(config)
    sub, st = ibinn._index(p["net"]["high"], 1), ibinn._index(p["bn"]["high"], 1)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, 4, 4, 2)))
    out, new = ibinn._conv_subnet(sub, st, jnp.asarray(x), ibinn._Mode(config, False, None, False), relu_first=True, stride=stride)
    assert new == {}
    t = {k: jax.tree_util.tree_map(np.asarray, v) for k, v in sub.items()}
    s = jax.tree_util.tree_map(np.asarray, st)
    bn = lambda h, n: (h - s[n]["mean"]) / np.sqrt(s[n]["var"] + config.bn_eps) * t[n]["scale"] + t[n]["bias"]  # noqa: E731
    h = np.maximum(bn(_np_conv3x3(np.maximum(x, 0.0), t["conv1"]), "norm1"), 0.0)
    h = np.maximum(bn(_np_conv3x3(h, t["conv2"], stride), "norm2"), 0.0)
    ref = np.einsum("bhwc,co->bhwo", h, t["conv3"]["w"][0, 0]) + t["conv3"]["b"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_presets_noise_boundary():
    """The IB-INN presets train with the authors' unfolded noise, the Glow flow (and the logit
    map, which needs [0, 1]) with reflection; --noise-boundary overrides."""
    from cfjax.pipelines.train_flow import FlowArchitecture, FlowTraining, flow_config

    def boundary(**kw):
        arch = FlowArchitecture(**kw)
        return flow_config(arch, FlowTraining().resolved(arch.arch), (28, 28, 1), 10).noise_boundary

    assert boundary(arch="ibinn-small") == "none" and boundary(arch="ibinn") == "none"
    assert boundary(arch="glow") == "reflect"
    assert boundary(arch="ibinn-small", preprocess="logit") == "reflect"
    assert boundary(arch="ibinn-small", noise_boundary="reflect") == "reflect"
    assert boundary(arch="glow", noise_boundary="none") == "none"
