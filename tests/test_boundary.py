"""Decision-boundary experiment (cfjax.pipelines.boundary) on a toy linear model: fast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.errors import CfjaxError
from cfjax.pipelines import boundary as B

W = np.zeros((16, 2), np.float32)
W[:8, 0] = 1.0  # class 0: left half brighter; class 1: right half brighter
W[8:, 1] = 1.0


def toy_logits(x):
    return x.reshape(x.shape[0], -1) @ W


def _queries(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 4, 4, 1)).astype(np.float32) * 0.5
    return x


def _counterfactuals(x):
    """Closed-form 'counterfactuals' for the toy model: shift mass to the other half, just past the boundary."""
    flat = x.reshape(len(x), -1)
    y = np.argmax(flat @ W, -1)
    gap = np.abs(flat[:, :8].sum(1) - flat[:, 8:].sum(1)) / 8 + 0.05
    d = np.where(y[:, None] == 0, np.r_[-np.ones(8), np.ones(8)][None], np.r_[np.ones(8), -np.ones(8)][None]) * gap[:, None]
    return np.clip(flat + d, 0, 1).reshape(x.shape).astype(np.float32), (1 - y).astype(np.int32)


def test_perturbations_keep_the_budget_and_pgd_crosses():
    x = _queries(32)
    x_cf, t = _counterfactuals(x)
    sets = B.perturbation_sets(toy_logits, x, x_cf, t, pgd_steps=20)
    budget = np.linalg.norm((x_cf - x).reshape(32, -1), axis=1)
    for name in ("random", "adversarial"):
        l2 = np.linalg.norm((sets[name] - x).reshape(32, -1), axis=1)
        assert np.all(l2 <= budget * 1.001 + 1e-5), name
        assert sets[name].min() >= 0 and sets[name].max() <= 1
    adv_pred = np.argmax(np.asarray(toy_logits(jnp.asarray(sets["adversarial"]))), -1)
    rnd_pred = np.argmax(np.asarray(toy_logits(jnp.asarray(sets["random"]))), -1)
    assert np.mean(adv_pred == t) > 0.8          # the budget suffices for a targeted attack
    assert np.mean(rnd_pred == t) < np.mean(adv_pred == t)


def test_corruptions_shapes_ranges_and_effect():
    x = jnp.asarray(_queries(4))
    for c in B.CORRUPTIONS:
        y = B.corrupt(x, c, jax.random.PRNGKey(0))
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        assert (c == "clean") == bool(jnp.allclose(y, x))
    assert float(jnp.std(B.corrupt(x, "contrast"))) < float(jnp.std(x))
    with pytest.raises(CfjaxError, match="corruption"):
        B.corrupt(x, "fog")


def test_surrogate_learns_a_linear_boundary_and_experiment_rows():
    x = _queries(64)
    x_cf, t = _counterfactuals(x)
    x_test = _queries(200, seed=1)
    res = B.run_experiment(toy_logits, x, x_cf, t, x_test, seeds=2, steps=300)
    rows = {(r["set"], r["surrogate"], r["corruption"]): r for r in res["rows"]}
    assert len(rows) == 4 * 2 * 4
    cf = rows[("counterfactual", "linear", "clean")]
    assert cf["flip_rate"] > 0.9 and cf["n_train"] == 128
    assert rows[("queries only", "linear", "clean")]["n_train"] == 64
    assert cf["agreement_mean"] > 0.8
    for r in res["rows"]:
        assert 0.0 <= r["agreement_mean"] <= 1.0


def test_bad_arguments():
    x = _queries(4)
    with pytest.raises(CfjaxError, match="surrogate"):
        B.init_surrogate(jax.random.PRNGKey(0), "forest", 16, 2)
    with pytest.raises(CfjaxError, match="steps"):
        B.pgd_l2(toy_logits, jnp.asarray(x), jnp.zeros(4, jnp.int32), jnp.ones(4), steps=0)
    with pytest.raises(CfjaxError, match="x_cf"):
        B.perturbation_sets(toy_logits, x, x[:, :2], np.zeros(4, np.int32))
    with pytest.raises(CfjaxError, match="at least one"):
        B.run_experiment(toy_logits, x[:0], x[:0], np.zeros(0, np.int32), x)
