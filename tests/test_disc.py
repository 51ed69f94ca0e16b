"""DISC: objective terms against NumPy, BatchNorm capture, priors, the batched optimiser, the CLI."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfjax.errors import CfjaxError
from cfjax.methods import disc
from cfjax.models import priors

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------
# A tiny BatchNorm classifier (stride-1 convs, so NumPy can recompute every layer).


class TinyBN(nn.Module):
    classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = nn.Conv(5, (3, 3), name="conv2")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn2")(x))
        x = jnp.mean(x, (1, 2))
        x = nn.Dense(6, name="fc")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn3")(x))
        return nn.Dense(self.classes, name="head")(x)


class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _tiny():
    model = TinyBN()
    v = model.init(jax.random.key(1), jnp.zeros((1, 6, 6, 1)))
    # Non-trivial running statistics.
    stats = jax.tree_util.tree_map(lambda a: jnp.asarray(RNG.uniform(0.2, 0.8, a.shape), jnp.float32), v["batch_stats"])
    return model, {"params": v["params"], "batch_stats": stats}


def _np_conv_same(x, k, b):
    """x (B, H, W, Ci), k (3, 3, Ci, Co): stride-1 'SAME' cross-correlation, NumPy loops."""
    bsz, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((bsz, h, w, k.shape[-1]))
    for i in range(h):
        for j in range(w):
            patch = xp[:, i : i + 3, j : j + 3, :]
            out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, k) + b
    return out


def _np_bn(h, stats, p, eps=1e-5):
    return (h - stats["mean"]) / np.sqrt(stats["var"] + eps) * p["scale"] + p["bias"]


def _np_forward(v, x):
    """NumPy forward of TinyBN in eval mode: (logits, [bn inputs], penultimate features)."""
    p = jax.tree_util.tree_map(np.asarray, v["params"])
    s = jax.tree_util.tree_map(np.asarray, v["batch_stats"])
    x = np.asarray(x, np.float64)
    h1 = _np_conv_same(x, p["conv1"]["kernel"], p["conv1"]["bias"])
    a1 = np.maximum(_np_bn(h1, s["bn1"], p["bn1"]), 0)
    h2 = _np_conv_same(a1, p["conv2"]["kernel"], p["conv2"]["bias"])
    a2 = np.maximum(_np_bn(h2, s["bn2"], p["bn2"]), 0)
    g = a2.mean((1, 2))
    h3 = g @ p["fc"]["kernel"] + p["fc"]["bias"]
    a3 = np.maximum(_np_bn(h3, s["bn3"], p["bn3"]), 0)
    logits = a3 @ p["head"]["kernel"] + p["head"]["bias"]
    return logits, [h1, h2, h3], a3


# ------------------------------------------------------------------------------------------
# Objective terms against NumPy.


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_target_class_loss_matches_numpy():
    logits = RNG.normal(size=(5, 4)).astype(np.float32) * 3
    t = np.array([0, 1, 2, 3, 1])
    lp = _np_log_softmax(logits.astype(np.float64))[np.arange(5), t]
    np.testing.assert_allclose(disc.target_class_loss(logits, t, "ce"), -lp, rtol=1e-5)
    for tp in (0.3, 0.9):
        np.testing.assert_allclose(disc.target_class_loss(logits, t, "prob", tp), np.maximum(0.0, np.log(tp) - lp), rtol=1e-5, atol=1e-6)
    # Zero exactly where p(target) >= target_prob.
    p = np.exp(lp)
    assert np.all((np.asarray(disc.target_class_loss(logits, t, "prob", 0.3)) == 0) == (p >= 0.3))


def test_feature_and_pixel_terms_match_numpy():
    a, b = RNG.normal(size=(3, 4, 5)), RNG.normal(size=(3, 4, 5))
    np.testing.assert_allclose(disc.feature_proximity(a, b), ((a - b) ** 2).reshape(3, -1).mean(1), rtol=1e-6)
    x, q = RNG.uniform(size=(2, 5, 6, 3)), RNG.uniform(size=(2, 5, 6, 3))
    np.testing.assert_allclose(disc.pixel_proximity(x, q, 1), np.abs(x - q).mean((1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(disc.pixel_proximity(x, q, 2), ((x - q) ** 2).mean((1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(disc.l2_prior(x), (x**2).mean((1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(disc.ink_prior(x), (x - x**2).mean((1, 2, 3)), rtol=1e-6)
    assert float(disc.ink_prior(np.round(x))[0]) == 0.0  # pure ink and paper cost nothing
    need = 0.5 * q.mean((1, 2, 3))
    np.testing.assert_allclose(disc.ink_shortfall(x, q, 0.5), np.maximum(0, need - x.mean((1, 2, 3))) / need, rtol=1e-5)
    np.testing.assert_allclose(disc.ink_shortfall(np.zeros_like(q), q, 0.5), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(disc.ink_shortfall(q, q, 0.5), [0.0, 0.0])
    frame = np.ones((5, 6), bool)
    frame[1:4, 1:5] = False  # width 1 on a 5x6 image: 30 - 12 = 18 border pixels
    np.testing.assert_allclose(disc.frame_ink(x, 1), x[:, frame].mean((1, 2)), rtol=1e-6)
    centred = np.zeros((1, 28, 28, 1))
    centred[0, 4:24, 4:24] = 1.0
    assert float(disc.frame_ink(centred, 4)[0]) == 0.0 and float(disc.frame_ink(1.0 - centred, 4)[0]) == 1.0


def test_total_variation_matches_numpy_loops():
    x = RNG.uniform(size=(2, 5, 6, 2))
    want = np.zeros(2)
    for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):  # horizontal, vertical, both diagonals
        sq = []
        for i in range(5):
            for j in range(6):
                i2, j2 = i + di, j + dj
                if 0 <= i2 < 5 and 0 <= j2 < 6:
                    sq.append((x[:, i2, j2, :] - x[:, i, j, :]) ** 2)
        want += np.stack(sq, 1).mean((1, 2))
    np.testing.assert_allclose(disc.total_variation(x), want, rtol=1e-6)
    assert float(disc.total_variation(np.ones((1, 4, 4, 1)))[0]) == 0.0


def test_manifold_consistency_matches_numpy():
    logk = -RNG.uniform(0, 5, size=(4, 3))
    t = np.array([0, 2, 1, 1])
    k = np.exp(logk)
    np.testing.assert_allclose(disc.manifold_consistency(k, t, "nll"), -logk[np.arange(4), t], rtol=1e-5)
    np.testing.assert_allclose(disc.manifold_consistency(logk, t, "nll", is_log=True), -logk[np.arange(4), t], rtol=1e-6)
    np.testing.assert_allclose(disc.manifold_consistency(k, t, "max"), 1 - k.max(1), rtol=1e-5)
    np.testing.assert_allclose(disc.manifold_consistency(logk, t, "max", is_log=True), 1 - k.max(1), rtol=1e-5)


def _np_bn_loss(layers, stats, convention, w0):
    total = 0.0 if convention == "batch" else np.zeros(layers[0].shape[0])
    for i, (h, (m, v)) in enumerate(zip(layers, stats)):
        w = w0 if i == 0 else 1.0
        if convention == "batch":
            flat = h.reshape(-1, h.shape[-1])
            total += w * (np.linalg.norm(flat.mean(0) - m) + np.linalg.norm(flat.var(0) - v))
        else:
            if h.ndim == 2:
                continue
            for b in range(h.shape[0]):
                flat = h[b].reshape(-1, h.shape[-1])
                total[b] += w * (np.linalg.norm(flat.mean(0) - m) + np.linalg.norm(flat.var(0) - v))
    return total


def test_bn_statistics_loss_matches_numpy_both_conventions():
    layers = [RNG.normal(1.0, 2.0, size=(3, 5, 4, 6)), RNG.normal(size=(3, 3, 3, 2)), RNG.normal(size=(3, 7))]
    stats = [(RNG.normal(size=h.shape[-1]), RNG.uniform(0.5, 2, size=h.shape[-1])) for h in layers]
    for conv in ("batch", "image"):
        got = disc.bn_statistics_loss([jnp.asarray(h, jnp.float32) for h in layers], stats, conv, 10.0)
        np.testing.assert_allclose(got, _np_bn_loss(layers, stats, conv, 10.0), rtol=1e-4)
    assert disc.bn_statistics_loss(layers, stats, "image").shape == (3,)
    assert disc.bn_statistics_loss(layers, stats, "batch").shape == ()


def test_bn_conventions_differ_on_a_batch_and_agree_on_one_image():
    layers = [RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 3, 3, 2)) + np.array([0.0, 3.0])[:, None, None, None]]
    stats = [(np.zeros(h.shape[-1]), np.ones(h.shape[-1])) for h in layers]
    batch = float(disc.bn_statistics_loss(layers, stats, "batch"))
    image = np.asarray(disc.bn_statistics_loss(layers, stats, "image"))
    assert abs(batch - image.mean()) > 0.05  # per-batch != mean of per-image statistics
    one = [h[:1] for h in layers]
    np.testing.assert_allclose(disc.bn_statistics_loss(one, stats, "batch"), disc.bn_statistics_loss(one, stats, "image")[0], rtol=1e-6)
    # What vmap gives: "batch" statistics of single examples = the per-image convention.
    per = jax.vmap(lambda a, b: disc.bn_statistics_loss([a[None], b[None]], stats, "batch"))(*[jnp.asarray(h) for h in layers])
    np.testing.assert_allclose(per, image, rtol=1e-5)


def test_reaches_target_matches_numpy():
    p = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    t = np.array([0, 0, 1])
    np.testing.assert_array_equal(disc.reaches_target(p, t, 0.15), [True, False, False])
    np.testing.assert_array_equal(disc.reaches_target(p, t, 0.0), [True, True, False])


def test_gradients_are_finite_and_nonzero():
    x = jnp.asarray(RNG.uniform(size=(2, 5, 5, 1)), jnp.float32)
    q = jnp.asarray(RNG.uniform(size=(2, 5, 5, 1)), jnp.float32)
    logits = jnp.asarray(RNG.normal(size=(2, 4)), jnp.float32)
    t = jnp.array([1, 3])
    fns = {
        "ce": lambda z: disc.target_class_loss(z, t).sum(),
        "prob": lambda z: disc.target_class_loss(z, t, "prob", 0.99).sum(),
        "mc": lambda z: disc.manifold_consistency(z, t, "nll", is_log=True).sum(),
        "mc_max": lambda z: disc.manifold_consistency(z, t, "max", is_log=True).sum(),
    }
    for name, f in fns.items():
        g = jax.grad(f)(logits)
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    for name, f in {
        "tv": lambda a: disc.total_variation(a).sum(),
        "l2": lambda a: disc.l2_prior(a).sum(),
        "l1": lambda a: disc.pixel_proximity(a, q).sum(),
        "feat": lambda a: disc.feature_proximity(a, q).sum(),
        "bn_batch": lambda a: disc.bn_statistics_loss([a], [(jnp.zeros(1), jnp.ones(1))], "batch"),
        "bn_image": lambda a: disc.bn_statistics_loss([a], [(jnp.zeros(1), jnp.ones(1))], "image").sum(),
    }.items():
        g = jax.grad(f)(x)
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
    # Exactly matching statistics: the l2 norms sit at 0 and the gradient must stay finite.
    h = jnp.asarray(RNG.normal(size=(1, 4, 4, 2)), jnp.float32)
    mu, var = jnp.mean(h, (0, 1, 2)), jnp.var(h, (0, 1, 2))
    g = jax.grad(lambda a: disc.bn_statistics_loss([a], [(mu, var)], "batch"))(h)
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------
# Capturing BatchNorm inputs from a Flax model.


def test_capture_matches_manual_forward():
    model, v = _tiny()
    x = jnp.asarray(RNG.uniform(size=(2, 6, 6, 1)), jnp.float32)
    cap = jax.jit(lambda vv, xx: disc.capture(model.apply, vv, xx))(v, x)
    logits, bn_in, feats = _np_forward(v, x)
    np.testing.assert_allclose(cap.logits, logits, rtol=1e-4, atol=1e-5)
    assert len(cap.bn_inputs) == 3
    for got, want in zip(cap.bn_inputs, bn_in):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for (m, s), name in zip(cap.bn_stats, ("bn1", "bn2", "bn3")):
        np.testing.assert_array_equal(m, v["batch_stats"][name]["mean"])
        np.testing.assert_array_equal(s, v["batch_stats"][name]["var"])
    np.testing.assert_allclose(cap.features, feats, rtol=1e-4, atol=1e-5)
    # A named layer's output.
    named = disc.capture(model.apply, v, x, feature_layer="conv1")
    np.testing.assert_allclose(named.features, bn_in[0], rtol=1e-4, atol=1e-5)


def test_capture_feature_axis_not_last():
    class ChannelsFirstBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.transpose(x, (0, 3, 1, 2))  # (B, C, H, W)
            h = nn.BatchNorm(use_running_average=True, axis=1)(h)
            return nn.Dense(2)(h.reshape(h.shape[0], -1))

    m = ChannelsFirstBN()
    x = jnp.asarray(RNG.uniform(size=(2, 3, 3, 2)), jnp.float32)
    v = m.init(jax.random.key(0), x)
    cap = disc.capture(m.apply, v, x)
    np.testing.assert_allclose(cap.bn_inputs[0], x)  # moved back to features-last


def test_capture_refuses_training_mode_and_models_without_bn():
    model, v = _tiny()
    x = jnp.zeros((1, 6, 6, 1))
    with pytest.raises(CfjaxError, match="training mode"):
        disc.capture(lambda vv, xx: model.apply(vv, xx, train=True, mutable=["batch_stats"])[0], v, x)
    nobn = NoBN()
    vn = nobn.init(jax.random.key(0), x)
    with pytest.raises(CfjaxError, match="no BatchNorm layers; set lambda_bn to 0"):
        disc.generate(nobn.apply, vn, np.zeros((1, 6, 6, 1), np.float32), [1], disc.DISCConfig(steps=3, progressive=False, prior="pixels"))
    # ... and with the BN weight at 0 it runs.
    out = disc.generate(nobn.apply, vn, np.zeros((1, 6, 6, 1), np.float32), [1], disc.DISCConfig(steps=3, progressive=False, prior="pixels", lambda_bn=0.0))
    assert out["x_cf"].shape == (1, 6, 6, 1)


# ------------------------------------------------------------------------------------------
# Priors.


def test_pixels_prior_starts_at_query_and_coarse_delta_is_upsampled():
    q = jnp.asarray(RNG.uniform(size=(6, 6, 1)), jnp.float32)
    p, aux = priors.Pixels().init(None, q)
    np.testing.assert_allclose(priors.Pixels().render(p, aux), np.clip(q, 1e-3, 1 - 1e-3), atol=1e-6)
    coarse = priors.Pixels(factor=2)
    d, base = coarse.init(None, q)
    assert d.shape == (3, 3, 1)
    d = jnp.asarray(RNG.normal(size=d.shape), jnp.float32)
    img = coarse.render(d, base)
    logit = np.log(img) - np.log1p(-img)
    np.testing.assert_allclose(logit - base, jax.image.resize(d, (6, 6, 1), "bilinear"), atol=1e-3)
    # refine keeps the image.
    fine, d2, base2 = priors.Pixels().refine(d, base)
    np.testing.assert_allclose(fine.render(d2, base2), img, atol=1e-6)


def test_fourier_features_match_numpy():
    u = RNG.uniform(size=(4, 5, 2))
    b = RNG.normal(size=(3, 2)) * 4
    proj = 2 * np.pi * np.einsum("hwk,fk->hwf", u, b)
    np.testing.assert_allclose(priors.fourier_features(jnp.asarray(u), jnp.asarray(b)), np.concatenate([np.sin(proj), np.cos(proj)], -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, (7, 9)), (3, 2, (7, 8)), (3, 2, (8, 8)), (1, 1, (5, 6))])
def test_dip_patch_conv_matches_a_numpy_convolution(kernel, stride, hw):
    """The DIP's patches-times-matrix convolution against a direct NumPy sum over the window
    (flax's SAME padding: pad_total = max((out - 1) * stride + k - in, 0), the smaller half first),
    for one image and vmapped over per-example kernels (the way DISC calls it)."""
    cin, cout, n = 3, 5, 4
    x = RNG.normal(size=(n, 1, *hw, cin)).astype(np.float32)
    w = RNG.normal(size=(n, kernel, kernel, cin, cout)).astype(np.float32)

    def numpy_conv(xi, wi):
        h, wd = xi.shape[1:3]
        ho, wo = -(-h // stride), -(-wd // stride)
        ph, pw = max((ho - 1) * stride + kernel - h, 0), max((wo - 1) * stride + kernel - wd, 0)
        xp = np.pad(xi, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        out = np.zeros((1, ho, wo, cout))
        for i in range(ho):
            for j in range(wo):
                win = xp[0, i * stride:i * stride + kernel, j * stride:j * stride + kernel, :]
                out[0, i, j] = np.einsum("abc,abcd->d", win, wi)
        return out

    conv = lambda xi, wi: priors._patch_conv(xi, wi, (stride, stride), "SAME")  # noqa: E731
    got = jax.jit(jax.vmap(conv))(jnp.asarray(x), jnp.asarray(w))
    for k in range(n):
        np.testing.assert_allclose(got[k], numpy_conv(x[k], w[k]), rtol=1e-4, atol=1e-4)
    # and the same thing through the DIP generator, against flax's own lax convolution
    prior = priors.DIP(channels=(4, 8))
    assert prior.patch_conv
    q = jnp.asarray(RNG.uniform(size=(9, 10, 1)), jnp.float32)
    p, aux = prior.init(jax.random.key(1), q)
    ref = priors.DIP(channels=(4, 8), patch_conv=False).render(p, aux)
    np.testing.assert_allclose(prior.render(p, aux), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,steps,lr,options", [("inr", 150, 0.01, {}), ("dip", 60, 0.01, {"channels": (4, 8)})])
def test_generator_priors_fit_the_query(name, steps, lr, options):
    q = jnp.asarray(np.clip(RNG.normal(0.3, 0.3, size=(8, 8, 1)), 0, 1), jnp.float32)
    prior = priors.make_prior(name, **options)
    p, aux = prior.init(jax.random.key(0), q)
    x0 = jax.jit(prior.render)(p, aux)
    assert x0.shape == q.shape and float(x0.min()) >= 0 and float(x0.max()) <= 1
    mse0 = float(jnp.mean((x0 - q) ** 2))
    p, mse = jax.jit(lambda p, a: priors.fit_to_query(prior, p, a, q, steps, lr))(p, aux)
    np.testing.assert_allclose(mse, np.mean((np.asarray(jax.jit(prior.render)(p, aux)) - np.asarray(q)) ** 2), rtol=1e-4)
    assert float(mse) < 0.2 * mse0


# ------------------------------------------------------------------------------------------
# The optimiser.


@pytest.fixture(scope="module")
def small_mnist_classifier():
    """A small BN CNN on 14x14 MNIST (mnist5k, 2x2-average-pooled), trained for a few seconds."""
    from cfjax.data import load_dataset

    def down(a):
        return a.reshape(a.shape[0], 14, 2, 14, 2, 1).mean((2, 4))

    tr, te = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    xtr, ytr = down(tr.images[:2000]), tr.labels[:2000]

    class Small(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            for f in (8, 16):
                x = nn.Conv(f, (3, 3))(x)
                x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.Dense(32)(x.reshape(x.shape[0], -1))
            return nn.Dense(10)(nn.relu(x))

    m = Small()
    v = m.init(jax.random.key(0), jnp.zeros((1, 14, 14, 1)))
    tx = optax.adam(3e-3)
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))

    @jax.jit
    def step(state, x, y):
        p, s, o = state

        def loss(p):
            logits, upd = m.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (_, s2), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s2, o

    rng = np.random.default_rng(0)
    for _ in range(150):
        i = rng.integers(0, len(xtr), 64)
        state = step(state, xtr[i], ytr[i])
    v = {"params": state[0], "batch_stats": state[1]}
    xte = down(te.images[:200])
    acc = float(np.mean(np.argmax(m.apply(v, xte), -1) == te.labels[:200]))
    assert acc > 0.8, acc
    return m.apply, v, xte


def _fast(**kw):
    base = dict(prior="pixels", steps=40, lr=0.15, progressive=False, lambda_tv=0.1, lambda_l1=0.5, lambda_l2=0.0, lambda_bn=0.01, jitter=0)
    return disc.DISCConfig(**{**base, **kw})


def test_short_run_flips_predictions(small_mnist_classifier):
    apply_fn, v, x = small_mnist_classifier
    xq = x[:4]
    y0 = np.argmax(apply_fn(v, xq), -1)
    t = (y0 + 1) % 10
    out = disc.generate(apply_fn, v, xq, t, _fast(progressive=True, steps=60))
    assert out["trajectory"].shape == (3, 4, 14, 14, 1)
    np.testing.assert_array_equal(out["y_pred"], y0)
    np.testing.assert_array_equal(out["y_cf_pred"], t)
    assert bool(np.all(out["success"]))
    # Reported probabilities are the classifier's on the returned images.
    p = jax.nn.softmax(apply_fn(v, out["x_cf"]), -1)
    np.testing.assert_allclose(out["p_cf"], np.asarray(p)[np.arange(4), t], rtol=1e-4)
    x_cf = np.asarray(out["x_cf"])
    assert x_cf.min() >= 0 and x_cf.max() <= 1
    assert 0 < np.abs(x_cf - xq).mean() < 0.2


def test_image_objective_matches_numpy():
    """The public objective of a batch of images against TinyBN's NumPy forward and NumPy terms."""
    model, v = _tiny()
    x = RNG.uniform(size=(3, 6, 6, 1)).astype(np.float32)
    q = RNG.uniform(size=(3, 6, 6, 1)).astype(np.float32)
    t = np.array([0, 2, 1])
    cfg = disc.DISCConfig(prior="pixels", lambda_cf=1.5, lambda_tv=0.3, lambda_l2=0.2, lambda_l1=0.7, lambda_bn=0.05,
                          lambda_ink=0.9, lambda_keep=2.0, keep_fraction=0.9, lambda_frame=1.3, frame_width=1, first_bn_weight=4.0,
                          jitter=0)
    stage = disc.make_stage(model.apply, cfg, cfg.make_prior(), apply_kwargs={"train": False})
    assert (stage.steps, stage.mode, stage.use_bn, stage.use_feat) == (cfg.steps, "ce", True, False)
    d = disc.StageData(None, jnp.asarray(q), None, jnp.asarray(t), jnp.float32(1.0), v, None)
    total, per_ex, probs = disc.image_objective(jnp.asarray(x), d, stage)
    logits, bn_in, _ = _np_forward(v, x)
    stats = [(np.asarray(v["batch_stats"][k]["mean"]), np.asarray(v["batch_stats"][k]["var"])) for k in ("bn1", "bn2", "bn3")]
    xd = x.astype(np.float64)
    tv = sum(((a - b) ** 2).mean((1, 2, 3)) for a, b in ((xd[:, :, 1:], xd[:, :, :-1]), (xd[:, 1:], xd[:, :-1]),
                                                       (xd[:, 1:, 1:], xd[:, :-1, :-1]), (xd[:, 1:, :-1], xd[:, :-1, 1:])))
    want = (1.5 * -_np_log_softmax(logits)[np.arange(3), t] + 0.3 * tv + 0.2 * (xd**2).mean((1, 2, 3))
            + 0.7 * np.abs(xd - q).mean((1, 2, 3)) + 0.9 * (xd * (1 - xd)).mean((1, 2, 3))
            + 2.0 * np.maximum(0, 0.9 * q.mean((1, 2, 3)) - xd.mean((1, 2, 3))) / (0.9 * q.mean((1, 2, 3)))
            + 1.3 * (xd.sum((1, 2, 3)) - xd[:, 1:-1, 1:-1].sum((1, 2, 3))) / (36 - 16)
            + 0.05 * _np_bn_loss(bn_in, stats, "image", 4.0))
    np.testing.assert_allclose(per_ex, want, rtol=2e-4)
    np.testing.assert_allclose(total, want.mean(), rtol=2e-4)
    np.testing.assert_allclose(probs, np.exp(_np_log_softmax(logits)), rtol=1e-4, atol=1e-6)


def test_public_stage_pieces_compose_to_generate(small_mnist_classifier):
    """initialize + make_stage + run_stage, as a benchmark or a user's own loop calls them, give
    generate's answer for a one-stage run."""
    apply_fn, v, x = small_mnist_classifier
    xq = jnp.asarray(x[8:11])
    t = jnp.asarray((np.argmax(apply_fn(v, xq), -1) + 1) % 10, jnp.int32)
    cfg = _fast(steps=10)
    want = disc.generate(apply_fn, v, xq, t, cfg)
    prior, params, aux, fit_mse = disc.initialize(cfg, xq)
    stage = disc.make_stage(apply_fn, cfg, prior)
    _, best, found, last, _ = disc.run_stage(params, disc.StageData(aux, xq, None, t, jnp.float32(1.0), v, None), stage)
    got = np.where(np.asarray(found)[:, None, None, None], best, last)
    np.testing.assert_allclose(got, want["x_cf"], atol=1e-6)
    np.testing.assert_array_equal(found, want["stage_success"][0])
    np.testing.assert_array_equal(fit_mse, np.zeros(3))
    with pytest.raises(CfjaxError, match="target loss mode"):
        disc.make_stage(apply_fn, cfg, prior, mode="hinge")


def test_vmap_equals_loop_and_batch_convention_differs(small_mnist_classifier):
    apply_fn, v, x = small_mnist_classifier
    xq = x[4:7]
    t = (np.argmax(apply_fn(v, xq), -1) + 3) % 10
    keys = jax.random.split(jax.random.key(5), 3)
    cfg = _fast(steps=12, lambda_bn=1.0)
    joint = disc.generate(apply_fn, v, xq, t, cfg, key=keys)  # per-image statistics, vmapped
    ones = [disc.generate(apply_fn, v, xq[i : i + 1], t[i : i + 1], cfg, key=keys[i : i + 1]) for i in range(3)]
    for i in range(3):
        np.testing.assert_allclose(ones[i]["x_cf"][0], joint["x_cf"][i], atol=2e-4)
    batch = disc.generate(apply_fn, v, xq, t, cfg.replace(bn_convention="batch"), key=keys)
    assert np.abs(np.asarray(batch["x_cf"]) - np.asarray(joint["x_cf"])).max() > 1e-3
    # For a single image the two conventions are the same objective.
    b1 = disc.generate(apply_fn, v, xq[:1], t[:1], cfg.replace(bn_convention="batch"), key=keys[:1])
    np.testing.assert_allclose(b1["x_cf"], ones[0]["x_cf"], atol=2e-4)


def test_jitter_key_is_a_pure_function_of_the_step_and_covers_the_window():
    dot = np.zeros((1, 9, 9, 1), np.float32)
    dot[0, 4, 4, 0] = 1.0

    def offset(step):  # where the step's translation puts the centre pixel
        moved = np.asarray(disc.random_shift(disc.jitter_key(jnp.int32(step)), jnp.asarray(dot), 2))[0, :, :, 0]
        return tuple(int(v) - 4 for v in np.argwhere(moved == 1.0)[0])

    offsets = [offset(s) for s in range(300)]
    assert {o for o in offsets} == {(i, j) for i in range(-2, 3) for j in range(-2, 3)}
    assert offset(7) == offsets[7] and offset(123) == offsets[123]


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_jitter_changes_the_optimisation_but_not_the_contract(small_mnist_classifier):
    apply_fn, v, x = small_mnist_classifier
    xq = x[8:12]
    t = (np.argmax(apply_fn(v, xq), -1) + 1) % 10
    plain = disc.generate(apply_fn, v, xq, t, _fast(steps=60))
    jit1 = disc.generate(apply_fn, v, xq, t, _fast(steps=60, jitter=1))
    assert np.abs(np.asarray(jit1["x_cf"]) - np.asarray(plain["x_cf"])).max() > 1e-3
    # success and the reported classes are judged on x_cf itself, never on a shifted copy
    pred = np.argmax(np.asarray(apply_fn(v, jit1["x_cf"])), -1)
    np.testing.assert_array_equal(pred, jit1["y_cf_pred"])
    p = np.asarray(jax.nn.softmax(apply_fn(v, jit1["x_cf"]), -1))
    gap = p[np.arange(4), t] - np.max(np.where(np.eye(10)[t] > 0, -np.inf, p), -1)
    np.testing.assert_array_equal(np.asarray(jit1["success"]), gap >= _fast().margin)
    for bad in (-1, 1.5, True):
        with pytest.raises(CfjaxError, match="jitter"):
            disc.DISCConfig(jitter=bad)


def test_manifold_term_pulls_towards_the_target_centroid():
    model, v = _tiny()
    centroids = jnp.asarray(RNG.uniform(size=(3, 6, 6, 1)), jnp.float32)

    def log_kernel(c, x):  # a stand-in DUQ: log K_c = -mean (x - e_c)^2 / (2 * 0.1^2)
        return -jnp.mean((x[:, None] - c[None]) ** 2, (2, 3, 4)) / 0.02

    xq = np.full((2, 6, 6, 1), 0.5, np.float32)
    t = np.array([1, 2])
    cfg = disc.DISCConfig(prior="pixels", steps=30, progressive=False, lambda_cf=0.0, lambda_bn=0.0, lambda_tv=0.0, lambda_l1=0.0, lambda_l2=0.0, lambda_mc=1.0, jitter=0)
    out = disc.generate(model.apply, v, xq, t, cfg, duq=(log_kernel, centroids))
    before = -np.asarray(log_kernel(centroids, xq))[np.arange(2), t]
    after = -np.asarray(log_kernel(centroids, out["x_cf"]))[np.arange(2), t]
    assert np.all(after < 0.5 * before)
    with pytest.raises(CfjaxError, match="duq must be a pair"):
        disc.generate(model.apply, v, xq, t, cfg, duq=log_kernel)


# The INR prior (the CLI default) also runs in test_cli_contract_on_shipped_models; this
# coarse-to-fine run on top of it is slow on 2 cores.
@pytest.mark.slow
def test_inr_prior_and_coarse_to_fine_run(small_mnist_classifier):
    apply_fn, v, x = small_mnist_classifier
    xq = x[7:9]
    t = (np.argmax(apply_fn(v, xq), -1) + 1) % 10
    out = disc.generate(apply_fn, v, xq, t, _fast(prior="inr", lr=0.01, steps=30, fit_steps=120, fit_lr=0.01, prior_options=(("hidden", 32), ("num_features", 16))))
    assert np.all(np.asarray(out["fit_mse"]) < 0.03)  # (a random generator starts near 0.2)
    assert out["x_cf"].shape == xq.shape and out["trajectory"].shape == (1, 2, 14, 14, 1)
    c2f = disc.generate(apply_fn, v, xq, t, _fast(coarse_to_fine=True, steps=30))
    assert c2f["trajectory"].shape == (2, 2, 14, 14, 1)  # coarse phase, fine phase


def test_bad_inputs_raise():
    for kw, msg in [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(prior="gan"), "unknown prior"),
        (dict(lambda_tv=-1.0), "lambda_tv"),
        (dict(lambda_bn=float("nan")), "lambda_bn"),
        (dict(stages=(0.6, 0.3)), "stages"),
        (dict(stages=(0.3, 1.2)), "stages"),
        (dict(stages=(0.0, 0.5)), "stages"),
        (dict(prior="inr", coarse_to_fine=True), "coarse_to_fine"),
        (dict(bn_convention="layer"), "bn_convention"),
        (dict(schedule="step"), "schedule"),
        (dict(margin=1.5), "margin"),
        (dict(keep_fraction=0.0), "keep_fraction"),
        (dict(lambda_keep=-1.0), "lambda_keep"),
        (dict(lr=0.0), "lr"),
        (dict(prior_options=(("bogus", 1),)), "prior_options"),
    ]:
        with pytest.raises(CfjaxError, match=msg):
            disc.DISCConfig(**kw)
    model, v = _tiny()
    good = np.full((2, 6, 6, 1), 0.5, np.float32)
    cfg = disc.DISCConfig(steps=3, progressive=False, prior="pixels")
    bad = good.copy()
    bad[0, 1, 1, 0] = np.nan
    with pytest.raises(CfjaxError, match="NaN"):
        disc.generate(model.apply, v, bad, [0, 1], cfg)
    with pytest.raises(CfjaxError, match="outside"):
        disc.generate(model.apply, v, good, [0, 3], cfg)
    with pytest.raises(CfjaxError, match="shape"):
        disc.generate(model.apply, v, good, [0, 1, 2], cfg)
    with pytest.raises(CfjaxError, match=r"\(N, H, W, C\)"):
        disc.generate(model.apply, v, good[0], [0], cfg)
    with pytest.raises(CfjaxError, match="target_prob"):
        disc.target_class_loss(jnp.zeros((1, 3)), jnp.zeros(1, int), "prob")


# ------------------------------------------------------------------------------------------
# The CLI on the shipped models.


def test_cli_contract_on_shipped_models(tmp_path, capsys):
    from cfjax.cli import main
    from cfjax.pipelines.explain_common import load_cf_npz

    out, png = tmp_path / "cf.npz", tmp_path / "grid.png"
    rc = main(["explain", "disc", "--limit", "4", "--steps", "6", "--fit-steps", "10", "--out", str(out), "--png", str(png), "--quiet"])
    assert rc == 0
    d = load_cf_npz(out)
    assert d["x"].shape == d["x_cf"].shape == (4, 28, 28, 1)
    assert str(d["method"]) == "disc" and float(d["seconds"]) > 0
    assert d["trajectory"].shape[1:] == (4, 28, 28, 1) and d["trajectory"].shape[0] == len(disc.DISCConfig().stages)
    np.testing.assert_array_equal(d["y_target"], (d["y_pred"] + 1) % 10)
    assert d["p_pred"].shape == d["p_cf"].shape == (4,)
    assert png.stat().st_size > 1000
    # Bad values: one line, exit 2, nothing written.
    for argv, msg in [
        (["--steps", "0"], "--steps"),
        (["--prior", "vae"], "unknown prior"),
        (["--target", "10"], "outside"),
        (["--manifold", "flow"], "--manifold"),
        (["--bn-weight", "-1"], "--bn-weight"),
    ]:
        bad = tmp_path / "bad.npz"
        capsys.readouterr()
        assert main(["explain", "disc", "--limit", "2", "--out", str(bad), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not bad.exists()


def test_disc_flags_reach_the_config():
    import argparse

    from cfjax.cli.explain import add_disc, disc_config

    p = argparse.ArgumentParser()
    add_disc(p)
    d = disc.DISCConfig()
    # the CLI defaults are the library's, with the "strokes" image priors for MNIST-family data
    strokes = disc.styled(d, "strokes")
    assert (strokes.lambda_ink, strokes.lambda_keep, strokes.lambda_frame) == (8.0, 5.0, 5.0) and disc.styled(strokes, "plain") == d
    assert disc_config(p.parse_args(["--out", "x.npz"])) == strokes
    assert disc_config(p.parse_args(["--out", "x.npz", "--data", "q.npz", "--model", "mnist5k"])) == strokes
    for plain in (["--data", "cifar10"], ["--data", "q.npz", "--model", "my_models/clf"], ["--style", "plain"]):
        assert disc_config(p.parse_args(["--out", "x.npz", *plain])) == d, plain
    assert disc_config(p.parse_args(["--out", "x.npz", "--data", "cifar10", "--style", "strokes", "--frame-weight", "0"])) == strokes.replace(lambda_frame=0.0)
    with pytest.raises(CfjaxError, match="unknown DISC style 'bold'"):
        disc.styled(d, "bold")
    cfg = disc_config(p.parse_args(["--out", "x.npz", "--jitter", "3", "--l1-weight", "0.25", "--mc-weight", "2", "--bn-weight", "0.5",
                                    "--tv-weight", "0.75", "--l2-weight", "0", "--ink-weight", "2", "--keep-ink-weight", "4",
                                    "--frame-weight", "3", "--keep-ink-fraction", "0.25"]))
    assert (cfg.jitter, cfg.lambda_l1, cfg.lambda_mc, cfg.lambda_bn, cfg.lambda_tv, cfg.lambda_l2, cfg.lambda_ink, cfg.lambda_keep,
            cfg.lambda_frame, cfg.keep_fraction) == (3, 0.25, 2.0, 0.5, 0.75, 0.0, 2.0, 4.0, 3.0, 0.25)
    assert disc_config(p.parse_args(["--out", "x.npz", "--manifold", "none", "--mc-weight", "2"])).lambda_mc == 0.0
