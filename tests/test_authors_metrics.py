"""The evaluation study's metrics (ElasticNet, IM1, IM2, Frechet distance) against independent
NumPy/SciPy computations, and the per-class autoencoders they need."""

import numpy as np
import pytest
import scipy.linalg

from cfjax import metrics
from cfjax.errors import CfjaxError
from cfjax.models import autoencoder


def _imgs(rng, n=6):
    return rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)


def test_elastic_net_matches_numpy():
    rng = np.random.default_rng(0)
    x, x_cf = _imgs(rng), _imgs(rng)
    d = (x_cf - x).reshape(len(x), -1)
    want = [np.linalg.norm(r, 1) + np.linalg.norm(r, 2) for r in d]
    np.testing.assert_allclose(metrics.elastic_net(x, x_cf, reduce=False), want, rtol=1e-5)
    np.testing.assert_allclose(metrics.elastic_net(x, x_cf), np.mean(want), rtol=1e-5)


def test_im1_im2_match_their_definitions():
    rng = np.random.default_rng(1)
    c, rt, rs, ra = (_imgs(rng) for _ in range(4))
    for i in range(len(c)):
        want1 = np.sum((c[i] - rt[i]) ** 2) / (np.sum((c[i] - rs[i]) ** 2) + 1e-5)
        want2 = np.sum((rt[i] - ra[i]) ** 2) / (np.sum(np.abs(c[i])) + 1e-5)
        assert metrics.im1(c, rt, rs, reduce=False)[i] == pytest.approx(want1, rel=1e-5)
        assert metrics.im2(c, rt, ra, reduce=False)[i] == pytest.approx(want2, rel=1e-5)
    # a perfect target reconstruction gives IM1 = 0; identical reconstructions give IM2 = 0
    assert float(metrics.im1(c, c, rs)) == pytest.approx(0.0, abs=1e-7)
    assert float(metrics.im2(c, ra, ra)) == pytest.approx(0.0, abs=1e-7)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((300, 5)) * 0.5 + 1.0
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * np.real(scipy.linalg.sqrtm(sa @ sb)))
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(CfjaxError, match="features"):
        metrics.frechet_distance(a, b[:, :3])


def test_class_autoencoders_prefer_their_own_class():
    rng = np.random.default_rng(3)
    n = 64
    x = np.zeros((2 * n, 8, 8, 1), np.float32)
    rows = rng.integers(1, 7, n)
    cols = rng.integers(1, 7, n)
    x[np.arange(n), rows, :, 0] = 1.0       # class 0: a horizontal bar
    x[n + np.arange(n), :, cols, 0] = 1.0   # class 1: a vertical bar
    y = np.repeat([0, 1], n)
    params = autoencoder.fit_autoencoders(x, y, 2, steps=150, batch_size=32, seed=0)
    err = lambda which: np.mean((autoencoder.reconstruct(params, x, np.full(2 * n, which)) - x) ** 2, axis=(1, 2, 3))
    e0, e1 = err(0), err(1)
    assert np.mean(e0[:n] < e1[:n]) > 0.9 and np.mean(e1[n:] < e0[n:]) > 0.9
    # IM1 with the true class as target and the other as source is below 1 for most images
    rt = autoencoder.reconstruct(params, x, y)
    rs = autoencoder.reconstruct(params, x, 1 - y)
    assert np.mean(np.asarray(metrics.im1(x, rt, rs, reduce=False)) < 1) > 0.9
    out = autoencoder.reconstruct(params, x[:3], np.array([0, 3, -1]))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))


def test_evaluate_study_columns(tmp_path, monkeypatch):
    """cfjax evaluate --study adds the study's columns; the autoencoders are fit once and cached."""
    import functools
    import json

    from cfjax.cli import main
    from cfjax.data import load_dataset

    monkeypatch.setenv("CFJAX_CACHE", str(tmp_path / "cache"))
    fits = []
    real_fit = autoencoder.fit_autoencoders

    def quick_fit(*a, **k):
        fits.append(1)
        return functools.partial(real_fit, steps=3)(*a, **k)

    monkeypatch.setattr(autoencoder, "fit_autoencoders", quick_fit)
    test = load_dataset("mnist5k", "test")
    x, y = test.images[:24], test.labels[:24]
    x_cf = test.images[24:48]
    cf = tmp_path / "cf.npz"
    np.savez(cf, x=x, x_cf=x_cf, y=y, y_pred=y, y_target=test.labels[24:48], y_cf_pred=test.labels[24:48])
    for _ in range(2):
        assert main(["evaluate", str(cf), "--oracle", "none", "--flow", "none", "--model", "none",
                     "--judges", "knn", "--study", "--json", str(tmp_path / "m.json")]) == 0
    assert len(fits) == 1  # the second run read the cache
    m = json.loads((tmp_path / "m.json").read_text())
    d = (x_cf - x).reshape(24, -1)
    assert m["elastic_net"] == pytest.approx(np.mean(np.abs(d).sum(1) + np.sqrt((d * d).sum(1))), rel=1e-5)
    assert np.isfinite(m["im1"]) and m["im1"] > 0 and np.isfinite(m["im2"]) and m["fid"] > 0
