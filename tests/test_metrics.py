"""cfjax.metrics against direct NumPy computations, and the `cfjax evaluate` CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax import metrics as M
from cfjax.cli import main
from cfjax.errors import CfjaxError

RNG = np.random.default_rng(1234)


def _pair(b=6, h=5, w=4, c=2, scale=0.3):
    x = RNG.random((b, h, w, c)).astype(np.float32)
    x_cf = np.clip(x + RNG.normal(0, scale, x.shape), 0, 1).astype(np.float32)
    return x, x_cf


# ---------------------------------------------------------------------------------------------
# validity, proximity, sparsity, runtime


def test_validity_matches_numpy():
    y_cf = RNG.integers(0, 4, 50)
    t = RNG.integers(0, 4, 50)
    np.testing.assert_allclose(M.validity(y_cf, t), np.mean(y_cf == t), rtol=1e-6)
    np.testing.assert_array_equal(M.validity(y_cf, t, reduce=False), (y_cf == t).astype(np.float32))
    assert float(M.validity(np.array([2, 2, 1]), 2)) == pytest.approx(2 / 3)


def test_proximity_variants_match_numpy():
    x, x_cf = _pair()
    d = (x_cf - x).astype(np.float64).reshape(len(x), -1)
    size = d.shape[1]
    l1 = np.abs(d).sum(1)
    l2 = np.sqrt((d**2).sum(1))
    np.testing.assert_allclose(M.proximity_l1(x, x_cf, reduce=False), l1, rtol=1e-5)
    np.testing.assert_allclose(M.proximity_l1(x, x_cf), l1.mean(), rtol=1e-5)
    np.testing.assert_allclose(M.proximity_l1_per_pixel(x, x_cf), (l1 / size).mean(), rtol=1e-5)
    np.testing.assert_allclose(M.proximity_l2(x, x_cf, reduce=False), l2, rtol=1e-5)
    np.testing.assert_allclose(M.proximity_l2(x, x_cf), l2.mean(), rtol=1e-5)
    np.testing.assert_allclose(M.proximity_l2_per_pixel(x, x_cf), np.sqrt((d**2).mean(1)).mean(), rtol=1e-5)
    assert float(M.proximity_l1(x, x)) == 0.0


def test_sparsity_uses_channel_max_and_threshold():
    x = np.zeros((2, 3, 3, 2), np.float32)
    x_cf = x.copy()
    x_cf[0, 0, 0, 1] = 0.5   # changed in one channel only: counts
    x_cf[0, 1, 1, 0] = 0.05  # below the threshold: does not count
    x_cf[1, :, :, :] = 0.2   # every pixel of image 1
    np.testing.assert_allclose(M.sparsity(x, x_cf, 0.1, reduce=False), [1 / 9, 1.0])
    xr, xr_cf = _pair(b=4, c=3)
    want = (np.abs(xr_cf - xr).max(-1) > 0.15).mean((1, 2)).mean()
    np.testing.assert_allclose(M.sparsity(xr, xr_cf, 0.15), want, rtol=1e-6)


def test_runtime_and_bad_shapes_raise():
    assert M.runtime_per_counterfactual(np.float32(3.0), 12) == pytest.approx(0.25)
    with pytest.raises(CfjaxError, match="positive"):
        M.runtime_per_counterfactual(1.0, 0)
    with pytest.raises(CfjaxError, match="finite"):
        M.runtime_per_counterfactual(np.nan, 3)
    x, x_cf = _pair()
    with pytest.raises(CfjaxError, match="same shape"):
        M.proximity_l1(x, x_cf[:, :-1])
    with pytest.raises(CfjaxError, match=r"\(B, H, W, C\)"):
        M.sparsity(x[0], x_cf[0])
    with pytest.raises(CfjaxError, match="y_target"):
        M.validity(np.zeros(3, int), np.zeros(4, int))


# ---------------------------------------------------------------------------------------------
# realism


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_nearest_neighbour_matches_brute_force(chunk):
    q = RNG.random((9, 4, 4, 1)).astype(np.float32)
    ref = RNG.random((23, 4, 4, 1)).astype(np.float32)
    lab = RNG.integers(0, 3, 23)
    lab[:3] = [0, 1, 2]
    t = RNG.integers(0, 3, 9)
    dist = np.linalg.norm(q.reshape(9, 1, -1) - ref.reshape(1, 23, -1), axis=-1)
    want = np.array([dist[i][lab == t[i]].min() for i in range(9)])
    got = M.nearest_neighbour_distance(q, ref, lab, t, chunk_size=chunk, reduce=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(M.nearest_neighbour_distance(q, ref, chunk_size=chunk, reduce=False), dist.min(1), rtol=1e-5)
    # A reference identical to the query is at distance exactly 0.
    assert float(M.nearest_neighbour_distance(ref[:2], ref, lab, lab[:2], chunk_size=chunk, reduce=False).max()) == 0.0


def test_nearest_neighbour_missing_class_is_inf():
    q = RNG.random((2, 3, 3, 1)).astype(np.float32)
    ref = RNG.random((5, 3, 3, 1)).astype(np.float32)
    got = M.nearest_neighbour_distance(q, ref, np.zeros(5, int), np.array([0, 1]), reduce=False)
    assert np.isfinite(got[0]) and np.isinf(got[1])


def test_pca_matches_numpy_and_reconstruction_error():
    # Data near a 3-dimensional subspace of R^24.
    basis = RNG.normal(size=(3, 24))
    imgs = (RNG.normal(size=(60, 3)) @ basis + 0.01 * RNG.normal(size=(60, 24)) + 0.5).reshape(60, 2, 4, 3).astype(np.float32)
    pca = M.fit_pca(imgs, 3)
    flat = imgs.reshape(60, -1).astype(np.float64)
    cov = np.cov(flat, rowvar=False)
    evals = np.sort(np.linalg.eigvalsh(cov))[::-1][:3]
    np.testing.assert_allclose(pca.explained_variance, evals, rtol=1e-4)
    v = np.asarray(pca.components, np.float64)
    np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-5)
    # Same subspace as the top eigenvectors (projections agree; signs do not matter).
    w, u = np.linalg.eigh(cov)
    top = u[:, np.argsort(w)[::-1][:3]]
    np.testing.assert_allclose(v.T @ v, top @ top.T, atol=1e-4)
    x = RNG.random((5, 2, 4, 3)).astype(np.float32)
    c = x.reshape(5, -1) - flat.mean(0)
    want = np.linalg.norm(c - c @ top @ top.T, axis=1)
    np.testing.assert_allclose(M.pca_reconstruction_error(x, pca, reduce=False), want, rtol=1e-4)
    assert float(M.pca_reconstruction_error(imgs, pca)) < 0.1 < float(M.pca_reconstruction_error(x, pca))
    with pytest.raises(CfjaxError, match="k"):
        M.fit_pca(imgs, 0)


def test_flow_bits_per_dim_and_oracle_use_the_callable_in_batches():
    x = RNG.random((7, 3, 3, 1)).astype(np.float32)
    fn = jax.jit(lambda z: jnp.sum(z**2, (1, 2, 3)))
    want = (x**2).sum((1, 2, 3))
    np.testing.assert_allclose(M.flow_bits_per_dim(fn, x, batch_size=3, reduce=False), want, rtol=1e-5)
    np.testing.assert_allclose(M.flow_bits_per_dim(fn, x, batch_size=None), want.mean(), rtol=1e-5)
    w = RNG.normal(size=(9, 4)).astype(np.float32)
    logits = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
    t = RNG.integers(0, 4, 7)
    pred = np.argmax(x.reshape(7, -1) @ w, -1)
    np.testing.assert_allclose(M.oracle_agreement(logits, x, t, batch_size=2), np.mean(pred == t), rtol=1e-6)
    labels = lambda z: jnp.argmax(logits(z), -1)  # noqa: E731
    np.testing.assert_array_equal(M.oracle_agreement(labels, x, pred, reduce=False), np.ones(7))


# ---------------------------------------------------------------------------------------------
# heatmap curves and attributions


def _linear_model(h=6, w=6, c=1, informative=8, seed=0):
    """Two-class linear model whose class-1 evidence lives on ``informative`` known pixels."""
    rng = np.random.default_rng(seed)
    d = h * w * c
    support = rng.choice(h * w, informative, replace=False)
    wv = np.zeros((h * w, c), np.float32)
    wv[support] = 1.0 + rng.random((informative, c)).astype(np.float32)
    wv = wv.reshape(d)
    W = np.stack([np.zeros(d, np.float32), wv], 1)  # (D, 2)

    def logits(x):
        return jnp.reshape(x, (x.shape[0], -1)) @ W - 2.0 * jnp.array([0.0, 1.0])

    return logits, W, support


def test_curves_match_a_direct_numpy_construction():
    logits, W, _ = _linear_model()
    proba = lambda z: jax.nn.softmax(logits(z), -1)  # noqa: E731
    x = RNG.random((3, 6, 6, 1)).astype(np.float32)
    hm = RNG.random((3, 6, 6)).astype(np.float32)
    steps = 4
    cls = np.array([1, 0, 1])
    dele = M.deletion_curve(proba, x, hm, cls, steps=steps, baseline=0.25)
    ins = M.insertion_curve(proba, x, hm, cls, steps=steps)
    np.testing.assert_allclose(dele.fractions, [0, 9 / 36, 18 / 36, 27 / 36, 1])
    for i in range(3):
        order = np.argsort(-hm[i].ravel(), kind="stable")
        for k, n in enumerate([0, 9, 18, 27, 36]):
            m = np.zeros(36, bool)
            m[order[:n]] = True
            xd = np.where(m, 0.25, x[i].ravel())
            xi = np.where(m, x[i].ravel(), 0.0)
            for xk, curve in ((xd, dele), (xi, ins)):
                z = xk @ W - 2.0 * np.array([0.0, 1.0])
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                np.testing.assert_allclose(curve.probs[i, k], p[cls[i]], rtol=1e-5)
    for curve in (dele, ins):
        np.testing.assert_allclose(curve.auc, np.trapezoid(np.asarray(curve.probs), np.asarray(curve.fractions), axis=1), rtol=1e-5)
    # Jitted and batched: the same numbers.
    jitted = jax.jit(lambda a, b, c: M.deletion_curve(proba, a, b, c, steps=steps, baseline=0.25).auc)
    np.testing.assert_allclose(jitted(x, hm, cls), dele.auc, rtol=1e-6)
    # A 4-D heatmap is summed over channels.
    np.testing.assert_allclose(M.deletion_curve(proba, x, hm[..., None], cls, steps=steps, baseline=0.25).auc, dele.auc, rtol=1e-6)


def test_true_feature_heatmap_beats_random_on_deletion_and_insertion():
    logits, W, support = _linear_model(informative=6)
    proba = lambda z: jax.nn.softmax(logits(z), -1)  # noqa: E731
    x = (0.3 + 0.7 * RNG.random((16, 6, 6, 1))).astype(np.float32)
    truth = (W[:, 1].reshape(1, 6, 6) * x[..., 0])  # evidence per pixel
    rand = RNG.random((16, 6, 6)).astype(np.float32)
    d_true = M.deletion_curve(proba, x, truth, 1).auc
    d_rand = M.deletion_curve(proba, x, rand, 1).auc
    i_true = M.insertion_curve(proba, x, truth, 1).auc
    i_rand = M.insertion_curve(proba, x, rand, 1).auc
    assert np.all(np.asarray(d_true) < np.asarray(d_rand))
    assert np.all(np.asarray(i_true) > np.asarray(i_rand))
    # Gradient x input and integrated gradients (black baseline) of a linear model are w * x:
    # the same order as the truth. Plain gradients (|w|) find the support but not its order.
    for attr in (M.gradient_x_input(logits, x, 1), M.integrated_gradients(logits, x, 1, steps=4)):
        np.testing.assert_allclose(M.deletion_curve(proba, x, attr, 1).auc, d_true, rtol=1e-5)
    d_grad = M.deletion_curve(proba, x, M.gradient_saliency(logits, x, 1), 1).auc
    assert np.all(np.asarray(d_grad) < np.asarray(d_rand)) and np.all(np.asarray(d_grad) >= np.asarray(d_true) - 1e-6)


def test_attributions_of_a_linear_model_are_exact():
    logits, W, _ = _linear_model(c=2)
    x = RNG.random((4, 6, 6, 2)).astype(np.float32)
    cls = np.array([1, 0, 1, 1])
    g = W[:, cls].T.reshape(4, 6, 6, 2)  # d logit_cls / dx
    np.testing.assert_allclose(M.gradient_saliency(logits, x, cls), np.abs(g).max(-1), rtol=1e-6)
    np.testing.assert_allclose(M.gradient_x_input(logits, x, cls), g * x, rtol=1e-6)
    np.testing.assert_allclose(M.integrated_gradients(logits, x, cls, steps=3, baseline=0.2), g * (x - 0.2), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_on_a_smooth_model():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w1 = jax.random.normal(k1, (48, 16)) / 4.0
    w2 = jax.random.normal(k2, (16, 3))

    def logits(x):
        return jnp.tanh(jnp.reshape(x, (x.shape[0], -1)) @ w1) @ w2

    x = jnp.asarray(RNG.random((5, 4, 4, 3)), jnp.float32)
    cls = jnp.array([0, 1, 2, 0, 1])
    base = 0.5 * jnp.ones_like(x)
    attr = M.integrated_gradients(logits, x, cls, steps=64, baseline=base)
    f = lambda z: np.take_along_axis(np.asarray(logits(z)), np.asarray(cls)[:, None], 1)[:, 0]  # noqa: E731
    gap = f(x) - f(base)
    np.testing.assert_allclose(np.asarray(attr).sum((1, 2, 3)), gap, atol=2e-3 * max(1.0, np.abs(gap).max()))
    assert np.abs(gap).min() > 1e-2  # the test is not trivially 0 = 0
    # Coarse paths are visibly less complete: the check can fail.
    coarse = M.integrated_gradients(logits, x, cls, steps=1, baseline=base)
    assert np.abs(np.asarray(coarse).sum((1, 2, 3)) - gap).max() > np.abs(np.asarray(attr).sum((1, 2, 3)) - gap).max()


# ---------------------------------------------------------------------------------------------
# FakeMNIST marker


def test_marker_mass():
    x = RNG.random((3, 10, 6, 1)).astype(np.float32) * 0.5
    y = np.array([2, 5, 7])
    t = np.array([4, 5, 0])
    x_cf = x.copy()
    x_cf[np.arange(3), y, 0, 0] = 0.0
    x_cf[np.arange(3), t, 0, 0] = 1.0
    classes = np.stack([y, t], 1)
    np.testing.assert_allclose(M.marker_mass(x_cf - x, classes, reduce=False), np.ones(3), rtol=1e-6)
    # Against NumPy for an arbitrary heatmap; the shared row of example 1 is counted once.
    hm = RNG.normal(size=(3, 10, 6)).astype(np.float32)
    mass = np.abs(hm)
    want = np.array([(mass[i, y[i], 0] + (mass[i, t[i], 0] if t[i] != y[i] else 0)) / mass[i].sum() for i in range(3)])
    np.testing.assert_allclose(M.marker_mass(hm, classes, reduce=False), want, rtol=1e-5)
    np.testing.assert_allclose(M.marker_mass(hm, t, reduce=False), mass[np.arange(3), t, 0] / mass.sum((1, 2)), rtol=1e-5)
    assert float(M.marker_mass(np.zeros((2, 10, 6)), np.array([1, 2]))) == 0.0
    with pytest.raises(CfjaxError, match="classes"):
        M.marker_mass(hm, np.zeros((2,), int))


# ---------------------------------------------------------------------------------------------
# the CLI


def _write_cf(path, n=12, heatmap=True, x=None, y=None, **overrides):
    """A synthetic CF.npz: random 28x28 'images' (or the given x, y), x_cf a sparse perturbation."""
    from cfjax.pipelines.explain_common import save_npz_atomic

    rng = np.random.default_rng(0)
    if x is None:
        x = (rng.random((n, 28, 28, 1)) * (rng.random((n, 28, 28, 1)) < 0.2)).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
    x_cf = np.clip(x + rng.normal(0, 0.2, x.shape) * (rng.random(x.shape) < 0.1), 0, 1).astype(np.float32)
    y_t = ((y + 1) % 10).astype(np.int32)
    arrays = dict(x=x, x_cf=x_cf, y=y, y_pred=y, y_target=y_t,
                  y_cf_pred=np.where(np.arange(n) % 3 == 0, y, y_t).astype(np.int32),
                  seconds=np.float32(0.6), method=np.array("synthetic"))
    if heatmap is True:
        arrays["heatmap"] = np.abs(x_cf - x).sum(-1)
    arrays.update(overrides)
    if heatmap is not True and heatmap is not False:
        arrays["heatmap"] = heatmap
    arrays = {k: v for k, v in arrays.items() if v is not None}
    save_npz_atomic(path, **arrays)
    return arrays


def _tiny_classifier(path, seed=0):
    from cfjax.checkpoint import save_checkpoint, write_model_info
    from cfjax.models.classifier import ClassifierConfig, init_classifier

    config = ClassifierConfig(arch="mlp", hidden=16, depth=1)
    variables = init_classifier(jax.random.PRNGKey(seed), config)
    save_checkpoint(path, 1, variables, {})
    write_model_info(path, "classifier", config.to_dict(), status="complete", inference_only=True)
    return config, variables


def test_cli_evaluate_synthetic_file(tmp_path, capsys):
    cf, out = tmp_path / "cf.npz", tmp_path / "m.json"
    a = _write_cf(cf)
    assert main(["evaluate", str(cf), "--oracle", "none", "--flow", "none", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "l1_per_pixel" in stdout and "SUM" in stdout  # the table says which l1
    m = json.loads(out.read_text())
    d = (a["x_cf"] - a["x"]).reshape(12, -1).astype(np.float64)
    assert m["n"] == 12 and m["method"] == "synthetic"
    assert m["validity"] == pytest.approx(np.mean(a["y_cf_pred"] == a["y_target"]))
    assert m["l1"] == pytest.approx(np.abs(d).sum(1).mean(), rel=1e-5)
    assert m["l1_per_pixel"] == pytest.approx(np.abs(d).mean(1).mean(), rel=1e-5)
    assert m["l2"] == pytest.approx(np.linalg.norm(d, axis=1).mean(), rel=1e-5)
    assert m["sparsity"] == pytest.approx((np.abs(d) > 0.1).mean(1).mean(), rel=1e-5)
    assert m["seconds_per_cf"] == pytest.approx(0.05)
    assert m["nn_distance"] > 0 and m["pca_error"] > 0 and m["nn_distance_query"] > 0
    for name in ("grey_share", "laplacian_energy", "isolated_ink"):  # texture of x_cf and, as yardstick, of x
        loops = np.array([_texture_loops(im) for im in a["x_cf"]]), np.array([_texture_loops(im) for im in a["x"]])
        col = ("grey_share", "laplacian_energy", "isolated_ink").index(name)
        assert m[name] == pytest.approx(loops[0][:, col].mean(), rel=1e-4)
        assert m[f"{name}_query"] == pytest.approx(loops[1][:, col].mean(), rel=1e-4)
    for k in ("oracle_agreement", "bits_per_dim", "deletion_auc"):
        assert k not in m
    assert set(m["skipped"]) == {"oracle", "flow", "heatmap"}


def test_cli_evaluate_with_models_disc_style_and_heatmap(tmp_path, capsys):
    model = tmp_path / "clf"
    config, variables = _tiny_classifier(model)
    from cfjax.models.classifier import classifier_apply

    # DISC-style file (no heatmap) with an explicit oracle.
    cf = tmp_path / "disc.npz"
    a = _write_cf(cf, heatmap=False)
    out = tmp_path / "disc.json"
    assert main(["evaluate", str(cf), "--data", "none", "--oracle", str(model), "--flow", "none", "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    pred = np.argmax(np.asarray(classifier_apply(config)(variables, a["x_cf"])), -1)
    assert m["oracle_agreement"] == pytest.approx(np.mean(pred == a["y_target"]))
    assert "deletion_auc" not in m and "nn_distance" not in m

    # ECINN-style file naming its model: heatmap curves for it and the baselines.
    cf2, out2 = tmp_path / "ecinn.npz", tmp_path / "ecinn.json"
    _write_cf(cf2, model=np.array(str(model)))
    assert main(["evaluate", str(cf2), "--data", "none", "--oracle", "none", "--flow", "none", "--heatmap-limit", "5",
                 "--steps", "4", "--ig-steps", "4", "--batch-size", "2", "--json", str(out2)]) == 0
    m2 = json.loads(out2.read_text())
    assert m2["heatmap_n"] == 5
    for name in ("", "_gradient", "_gradient_x_input", "_integrated_gradients", "_random"):
        for kind in ("deletion_auc", "insertion_auc"):
            assert 0.0 <= m2[kind + name] <= 1.0
    capsys.readouterr()


def test_cli_evaluate_with_a_flow_bits_per_dim_and_flow_heatmaps(tmp_path):
    from cfjax.checkpoint import save_checkpoint, write_model_info
    from cfjax.models import flow_classifier as fc
    from cfjax.models.glow import GlowConfig
    from cfjax.models.latent import LatentConfig
    from cfjax.pipelines.explain_common import save_npz_atomic

    glow = GlowConfig(image_shape=(8, 8, 1), num_levels=1, steps_per_level=1, hidden_channels=8, max_hidden_channels=8)
    config = fc.FlowClassifierConfig(glow=glow, latent=LatentConfig(num_classes=3))
    rng = np.random.default_rng(3)
    x = rng.random((6, 8, 8, 1)).astype(np.float32)
    params = fc.init_flow_classifier(jax.random.PRNGKey(0), config, jnp.asarray(x))
    flow = tmp_path / "flow"
    save_checkpoint(flow, 1, {"params": params}, {})
    write_model_info(flow, "flow", config.to_dict(), status="complete", inference_only=True)
    x_cf = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    cf, out = tmp_path / "cf.npz", tmp_path / "m.json"
    save_npz_atomic(cf, x=x, x_cf=x_cf, y=y, y_pred=y, y_target=(y + 1) % 3, y_cf_pred=(y + 1) % 3,
                    heatmap=np.abs(x_cf - x)[..., 0], model=np.array(str(flow)))
    assert main(["evaluate", str(cf), "--data", "none", "--flow", str(flow), "--oracle", "none", "--steps", "3",
                 "--ig-steps", "2", "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["bits_per_dim"] == pytest.approx(float(np.mean(fc.nll_bits_per_dim(params, config, jnp.asarray(x_cf)))), rel=1e-5)
    assert m["bits_per_dim_query"] == pytest.approx(float(np.mean(fc.nll_bits_per_dim(params, config, jnp.asarray(x)))), rel=1e-5)
    assert m["heatmap_model"] == str(flow) and m["heatmap_n"] == 6 and 0 <= m["deletion_auc"] <= 1
    # A flow for other image shapes, asked for explicitly, is one clear error.
    assert main(["evaluate", str(tmp_path / "cf.npz"), "--data", "none", "--flow", str(flow), "--oracle", "none",
                 "--model", "none"]) == 0
    other = tmp_path / "other.npz"
    _write_cf(other, n=3)
    assert main(["evaluate", str(other), "--data", "none", "--flow", str(flow), "--oracle", "none"]) == 2


def test_cli_evaluate_fakemnist_marker_mass(tmp_path):
    from cfjax.data import load_dataset

    ds = load_dataset("fakemnist5k", "test").take(8)
    t = ((ds.labels + 3) % 10).astype(np.int32)
    x_cf = ds.images.copy()
    x_cf[np.arange(8), ds.labels, 0, :] = 0.0  # only the markers change
    x_cf[np.arange(8), t, 0, :] = 1.0
    cf, out = tmp_path / "fake.npz", tmp_path / "fake.json"
    _write_cf(cf, n=8, x=ds.images, y=ds.labels, x_cf=x_cf, y_target=t, y_cf_pred=t, heatmap=np.abs(x_cf - ds.images)[..., 0])
    assert main(["evaluate", str(cf), "--data", "fakemnist5k", "--oracle", "none", "--flow", "none", "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["marker_mass"] == pytest.approx(1.0) and m["marker_mass_heatmap"] == pytest.approx(1.0)
    assert m["sparsity"] == pytest.approx(2 / 784)


def _bad_cases(tmp_path):
    good = tmp_path / "good.npz"
    _write_cf(good, n=4)
    text = tmp_path / "text.npz"
    text.write_text("not an npz")
    missing = tmp_path / "missing_keys.npz"
    _write_cf(missing, n=4, y_target=None)
    shape = tmp_path / "shape.npz"
    _write_cf(shape, n=4, y_cf_pred=np.zeros(3, np.int32))
    hm = tmp_path / "heatmap.npz"
    _write_cf(hm, n=4, heatmap=np.zeros((4, 27, 28), np.float32))
    small = tmp_path / "small.npz"
    z = np.zeros((2, 5, 5, 1), np.float32)
    np.savez(small, x=z, x_cf=z, y=np.zeros(2, np.int32), y_pred=np.zeros(2, np.int32),
             y_target=np.ones(2, np.int32), y_cf_pred=np.ones(2, np.int32))
    return {
        "missing file": ([str(tmp_path / "nope.npz")], "does not exist"),
        "not an npz": ([str(text)], "not a readable .npz"),
        "missing keys": ([str(missing)], "missing key(s) y_target"),
        "shape mismatch": ([str(shape)], "y_cf_pred must have shape (4,)"),
        "heatmap shape": ([str(hm)], "heatmap must have shape (4, 28, 28)"),
        "unwritable json": ([str(good), "--json", str(tmp_path / "no_dir" / "m.json")], "does not exist"),
        "missing oracle dir": ([str(good), "--data", "none", "--oracle", str(tmp_path / "nomodel")], "does not exist"),
        "image shape vs data": ([str(small)], "--data mnist5k images are (28, 28, 1)"),
    }


def test_cli_evaluate_bad_input_one_line_exit_2(tmp_path, capsys):
    for name, (argv, msg) in _bad_cases(tmp_path).items():
        capsys.readouterr()
        json_out = tmp_path / "out.json"
        extra = [] if "--json" in argv else ["--json", str(json_out)]
        code = main(["evaluate", *argv, "--flow", "none", *extra] + ([] if "--oracle" in argv else ["--oracle", "none"]))
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("cfjax: error:") and msg in err, (name, err)
        assert "Traceback" not in err
        assert not json_out.exists(), name
        assert not list(tmp_path.glob("**/*.json")), name


def test_cli_evaluate_error_in_a_subprocess(tmp_path):
    missing = tmp_path / "missing_keys.npz"
    np.savez(missing, x=np.zeros((2, 4, 4, 1), np.float32))
    p = subprocess.run([sys.executable, "-m", "cfjax.cli", "evaluate", str(missing), "--json", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "missing key(s)" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------
# stroke texture


def _texture_loops(img):
    """grey share, Laplacian energy and isolated-ink count of one (H, W, C) image, by loops."""
    g = img.mean(-1).astype(np.float64)
    h, w = g.shape

    def at(i, j):
        return g[i, j] if 0 <= i < h and 0 <= j < w else 0.0

    inked = [(i, j) for i in range(h) for j in range(w) if g[i, j] > 0.2]
    grey = sum(1 for i, j in inked if g[i, j] < 0.8) / max(len(inked), 1)
    lap = sum((4 * g[i, j] - at(i - 1, j) - at(i + 1, j) - at(i, j - 1) - at(i, j + 1)) ** 2 for i in range(h) for j in range(w))
    energy = lap / max(float((g**2).sum()), 1e-12)
    lone = 0
    for i in range(h):
        for j in range(w):
            around = sum(at(i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj) / 8
            lone += g[i, j] > 0.3 and around < 0.15
    return grey, energy, lone


def test_stroke_texture_matches_loops_and_known_images():
    x = (RNG.random((5, 7, 6, 2)) ** 3).astype(np.float32)  # mostly dark, some ink, some grey
    x[4] = 0.0  # a blank image: every measure 0, no division by zero
    expect = np.array([_texture_loops(im) for im in x])
    np.testing.assert_allclose(np.asarray(M.grey_share(x, reduce=False)), expect[:, 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(M.laplacian_energy(x, reduce=False)), expect[:, 1], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(M.isolated_ink(x, reduce=False)), expect[:, 2])
    assert np.isclose(float(M.grey_share(x)), expect[:, 0].mean(), rtol=1e-5)
    together = M.stroke_texture(x, reduce=False)
    assert tuple(together) == M.TEXTURE
    for col, name in enumerate(M.TEXTURE):
        np.testing.assert_allclose(np.asarray(together[name]), expect[:, col], rtol=1e-4, atol=1e-7)
    # a lone white pixel: one isolated pixel, Laplacian energy 16 + 4 = 20, no grey ink
    dot = np.zeros((1, 9, 9, 1), np.float32)
    dot[0, 4, 4] = 1.0
    assert float(M.isolated_ink(dot)) == 1.0 and np.isclose(float(M.laplacian_energy(dot)), 20.0)
    assert float(M.grey_share(dot)) == 0.0
    # a thick solid stroke: no lone pixels, lower energy than the dot; a grey smudge: all grey
    bar = np.zeros((1, 9, 9, 1), np.float32)
    bar[0, 2:7, 3:6] = 1.0
    assert float(M.isolated_ink(bar)) == 0.0 and float(M.laplacian_energy(bar)) < 20.0
    assert float(M.grey_share(bar * 0.5)) == 1.0
    with pytest.raises(CfjaxError, match=r"\(B, H, W, C\)"):
        M.grey_share(np.zeros((9, 9)))
