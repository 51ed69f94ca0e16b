"""DUQ (kernel, gradient penalty, centroid EMA, loss) against NumPy; its trainer, loader, CLI;
the DeepInversion synthesiser used for data-free training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax import checkpoint as ckpt
from cfjax.cli import main
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError, CheckpointError
from cfjax.models import duq
from cfjax.models.classifier import ClassifierConfig, classifier_apply, classifier_train_apply, init_classifier
from cfjax.pipelines import synthesize as syn
from cfjax.pipelines import train_duq as td
from cfjax.pipelines.training import fit

SMALL = duq.DUQConfig(num_classes=3, image_shape=(8, 8, 1), width=2, feature_dim=5, embed_dim=4, sigma=0.5)
TINY28 = duq.DUQConfig(width=4, feature_dim=16, embed_dim=8)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _perturbed_variables(config, seed=0):
    """Random centroids so that every class is at a different, non-trivial distance."""
    v = duq.init_duq(jax.random.PRNGKey(seed), config)
    rng = np.random.default_rng(seed)
    counts = rng.uniform(5, 20, size=config.num_classes).astype(np.float32)
    sums = (counts[:, None] * rng.normal(0, 0.3, size=(config.num_classes, config.embed_dim))).astype(np.float32)
    return {**v, "centroids": {"sums": jnp.asarray(sums), "counts": jnp.asarray(counts)}}


def _np_kernel(f, w, sums, counts, sigma):
    """NumPy K (B, C) from features f (B, F)."""
    z = np.einsum("cef,bf->bce", w, f)
    e = sums / counts[:, None]
    return np.exp(-np.mean((z - e[None]) ** 2, axis=-1) / (2 * sigma**2))


def test_config_round_trip_and_validation():
    assert duq.DUQConfig.from_dict(SMALL.to_dict()) == SMALL
    d = duq.DUQConfig()
    assert (d.sigma, d.gamma, d.lambda_gp) == (0.1, 0.999, 0.75)
    with pytest.raises(CfjaxError, match="sigma"):
        duq.DUQConfig(sigma=0.0)
    with pytest.raises(CfjaxError, match="gamma"):
        duq.DUQConfig(gamma=1.0)
    with pytest.raises(CfjaxError, match="not a DUQ config"):
        duq.DUQConfig.from_dict({"arch": "cnn"})


def test_init_shapes_and_centroid_init():
    v = duq.init_duq(jax.random.PRNGKey(0), TINY28)
    assert v["params"]["W"].shape == (10, 8, 16)
    np.testing.assert_array_equal(v["centroids"]["counts"], np.full(10, 13.0))
    e = np.asarray(duq.centroids(v))
    assert e.shape == (10, 8) and 0.02 < e.std() < 0.08  # normal(0, 0.05)


def test_kernel_matches_numpy():
    v = _perturbed_variables(SMALL)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(6, 8, 8, 1)).astype(np.float32))
    f = np.asarray(duq.duq_features(v, SMALL, x), np.float64)
    assert f.shape == (6, 5) and np.any(f > 0)
    ref = _np_kernel(f, np.asarray(v["params"]["W"], np.float64), np.asarray(v["centroids"]["sums"], np.float64),
                     np.asarray(v["centroids"]["counts"], np.float64), SMALL.sigma)
    k = np.asarray(duq.duq_kernel(v, SMALL, x))
    assert k.shape == (6, 3) and np.all((k >= 0) & (k <= 1))
    np.testing.assert_allclose(k, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(duq.duq_log_kernel(v, SMALL, x), np.log(ref), rtol=1e-5, atol=1e-5)
    pred, cert = duq.duq_predict(v, SMALL, x)
    np.testing.assert_array_equal(pred, ref.argmax(1))
    np.testing.assert_allclose(cert, ref.max(1), rtol=1e-5)
    # A point exactly on a centroid has K = 1 for that class.
    z = np.asarray(duq.duq_embed(v, SMALL, x[:1]))[0]
    v_on = {**v, "centroids": {"sums": jnp.asarray(z * 2.0), "counts": jnp.full((3,), 2.0)}}
    np.testing.assert_allclose(duq.duq_kernel(v_on, SMALL, x[:1]), np.ones((1, 3)), atol=1e-6)


def test_gradient_penalty_and_loss_match_finite_differences_and_numpy():
    with jax.enable_x64(True):
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), _perturbed_variables(SMALL, seed=3))
        x = np.random.default_rng(4).uniform(0.1, 0.9, size=(3, 8, 8, 1))
        y = np.array([0, 2, 1])
        sum_k = jax.jit(lambda xx: jnp.sum(duq.duq_kernel(v, SMALL, xx[None])))
        eps = 1e-6
        fd_norm = []
        for b in range(3):
            g = np.zeros(64)
            for i in range(64):
                d = np.zeros(64)
                d[i] = eps
                g[i] = (float(sum_k(jnp.asarray(x[b] + d.reshape(8, 8, 1)))) - float(sum_k(jnp.asarray(x[b] - d.reshape(8, 8, 1))))) / (2 * eps)
            fd_norm.append(np.linalg.norm(g))
        fd_norm = np.array(fd_norm)
        assert np.all(fd_norm > 1e-3)  # a non-trivial gradient
        gn = np.asarray(duq.duq_input_gradient_norm(v, SMALL, jnp.asarray(x)))
        np.testing.assert_allclose(gn, fd_norm, rtol=1e-5)

        k = np.asarray(duq.duq_kernel(v, SMALL, jnp.asarray(x)))
        onehot = np.eye(3)[y]
        bce = -np.mean(onehot * np.log(k) + (1 - onehot) * np.log(1 - k))
        gp = np.mean((fd_norm - 1.0) ** 2)
        loss, aux = duq.duq_loss(v, SMALL, jnp.asarray(x), jnp.asarray(y))
        np.testing.assert_allclose(float(aux["bce"]), bce, rtol=1e-6)
        np.testing.assert_allclose(float(aux["gp"]), gp, rtol=1e-5)
        np.testing.assert_allclose(float(loss), bce + SMALL.lambda_gp * gp, rtol=1e-5)
        np.testing.assert_allclose(float(aux["acc"]), np.mean(k.argmax(1) == y))


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_loss_gradient_survives_a_vanishing_kernel():
    """Far from every centroid K underflows to 0, yet -log K (the BCE) still has a gradient."""
    v = _perturbed_variables(SMALL)
    v = {**v, "centroids": {"sums": v["centroids"]["sums"] + 1e3, "counts": v["centroids"]["counts"]}}
    x = jnp.asarray(np.random.default_rng(5).uniform(size=(4, 8, 8, 1)).astype(np.float32))
    assert float(jnp.max(duq.duq_kernel(v, SMALL, x))) == 0.0
    g = jax.grad(lambda p: duq.duq_loss({**v, "params": p}, SMALL, x, jnp.array([0, 1, 2, 0]))[0])(v["params"])
    leaves = _leaves(g)
    assert all(np.all(np.isfinite(a)) for a in leaves)
    assert np.abs(leaves[-1]).max() > 0  # dL/dW


def test_centroid_ema_update_matches_numpy():
    v = _perturbed_variables(SMALL, seed=6)
    x = jnp.asarray(np.random.default_rng(7).uniform(size=(5, 8, 8, 1)).astype(np.float32))
    y = np.array([0, 0, 2, 2, 2])  # class 1 absent from the batch
    z = np.asarray(duq.duq_embed(v, SMALL, x), np.float64)
    g = SMALL.gamma
    m0, n0 = np.asarray(v["centroids"]["sums"], np.float64), np.asarray(v["centroids"]["counts"], np.float64)
    n_ref = g * n0 + (1 - g) * np.bincount(y, minlength=3)
    m_ref = g * m0.copy()
    for b in range(5):
        m_ref[y[b]] += (1 - g) * z[b, y[b]]
    new = duq.update_centroids(v, SMALL, x, jnp.asarray(y))
    np.testing.assert_allclose(new["centroids"]["counts"], n_ref, rtol=1e-6)
    np.testing.assert_allclose(new["centroids"]["sums"], m_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(_leaves(new["params"]), _leaves(v["params"])):
        np.testing.assert_array_equal(a, b)
    # gamma = 0 makes the centroid the batch mean of its class's embeddings.
    cfg0 = duq.DUQConfig(**{**SMALL.to_dict(), "gamma": 0.0})
    e = np.asarray(duq.centroids(duq.update_centroids(v, cfg0, x, jnp.asarray(y))))
    np.testing.assert_allclose(e[2], z[2:, 2].mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- trainer, loader, CLI


@pytest.fixture(scope="module")
def small():
    tr = load_dataset("mnist5k", "train")
    te = load_dataset("mnist5k", "test")
    return (
        Dataset("mnist5k", "train", tr.images[:64], tr.labels[:64], 10),
        Dataset("mnist5k", "test", te.images[:40], te.labels[:40], 10),
    )


def _run(small, out, **kw):
    train, test = small
    spec = td.build_spec(TINY28, 1e-3, 4, seed=0)
    return fit(spec, train, test, out, epochs=2, batch_size=32, seed=0, checkpoint_every=2, quiet=True, **kw)


def test_fit_load_resume_and_export(small, tmp_path):
    full, metrics = _run(small, tmp_path / "full")
    assert set(metrics) >= {"test_accuracy", "test_certainty", "noise_certainty"}
    variables, config, info = td.load_duq(tmp_path / "full")
    assert config == TINY28 and info["kind"] == "duq" and info["status"] == "complete"
    for a, b in zip(_leaves(variables), _leaves(td.variables_of(full))):
        np.testing.assert_array_equal(a, b)
    k = np.asarray(duq.duq_kernel(variables, config, jnp.asarray(small[1].images)))
    assert metrics["test_accuracy"] == pytest.approx(np.mean(k.argmax(1) == small[1].labels))
    assert metrics["test_certainty"] == pytest.approx(k.max(1).mean(), rel=1e-4)
    # Four steps moved the centroid counts by the EMA of the batch class counts.
    init = duq.init_duq(jax.random.PRNGKey(0), TINY28)
    assert not np.allclose(variables["centroids"]["counts"], init["centroids"]["counts"])
    np.testing.assert_allclose(np.sum(variables["centroids"]["counts"]),
                               130 * 0.999**4 + 32 * (1 - 0.999**4), rtol=1e-5)

    _, stopped = _run(small, tmp_path / "killed", max_steps=1)
    assert stopped == {"stopped_at_step": 1}
    with pytest.raises(CheckpointError, match="unfinished"):
        td.load_duq(tmp_path / "killed")
    resumed, _ = _run(small, tmp_path / "killed", resume=True)
    for a, b in zip(_leaves(resumed), _leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    td.export_inference_model(tmp_path / "full", tmp_path / "export")
    v2, c2, i2 = td.load_duq(tmp_path / "export")
    assert i2["inference_only"] and c2 == TINY28
    for a, b in zip(_leaves(v2), _leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_load_duq_rejects_other_kinds(tmp_path):
    ckpt.write_model_info(tmp_path / "c", "classifier", ClassifierConfig().to_dict(), status="complete")
    with pytest.raises(CheckpointError, match="holds a 'classifier' model, but a 'duq' model is needed"):
        td.load_duq(tmp_path / "c")
    with pytest.raises(CheckpointError, match="does not exist"):
        td.load_duq(tmp_path / "missing")


def test_cli_bad_inputs_one_line_exit_2(capsys, tmp_path):
    out = str(tmp_path / "d")
    cases = [
        (["--source", "gan"], "cfjax: error: unknown source 'gan': choose one of data, inversion (flag --source)"),
        (["--classifier", "x"], "cfjax: error: a classifier is only used with source 'inversion' (flag --classifier)"),
        (["--epochs", "0"], "cfjax: error: --epochs must be a positive integer, got 0"),
        (["--sigma", "-1"], "cfjax: error: --sigma must be a positive finite number, got -1"),
    ]
    for extra, msg in cases:
        assert main(["train", "duq", "--out", out, *extra]) == 2
        assert capsys.readouterr().err.strip() == msg
    assert not (tmp_path / "d").exists()
    mlp = tmp_path / "mlp"
    ckpt.write_model_info(mlp, "classifier", ClassifierConfig(arch="mlp", hidden=8, depth=1).to_dict(), status="complete", inference_only=True)
    ckpt.save_checkpoint(mlp, 1, init_classifier(jax.random.PRNGKey(0), ClassifierConfig(arch="mlp", hidden=8, depth=1)))
    assert main(["train", "duq", "--out", out, "--source", "inversion", "--classifier", str(mlp), "--synth-images", "10"]) == 2
    assert "needs a classifier with BatchNorm layers" in capsys.readouterr().err


# ---------------------------------------------------------------- DeepInversion synthesiser

CLF = ClassifierConfig(arch="cnn", width=4, hidden=8)


def test_inversion_bn_term_is_batch_statistics_with_first_layer_weight():
    # The BN term reuses DISC's capture; check its wiring (batch convention, first-layer weight)
    # against numpy statistics of the captured BatchNorm inputs.
    from cfjax.methods import disc

    v = init_classifier(jax.random.PRNGKey(0), CLF)
    rng = np.random.default_rng(0)
    v = {**v, "batch_stats": jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), v["batch_stats"])}
    x = jnp.asarray(rng.uniform(size=(5, 28, 28, 1)).astype(np.float32))
    cfg = syn.InversionConfig(first_bn_weight=7.0)
    _, aux = syn.inversion_loss(classifier_apply(CLF), v, cfg, x, jnp.zeros(5, jnp.int32))
    cap = disc.capture(classifier_apply(CLF), v, x, feature_layer=None)
    assert len(cap.bn_inputs) == 5
    ref = 0.0
    for i, (h, (rm, rv)) in enumerate(zip(cap.bn_inputs, cap.bn_stats)):
        h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
        term = np.linalg.norm(h.mean(0) - np.asarray(rm)) + np.linalg.norm(h.var(0) - np.asarray(rv))
        ref += (7.0 if i == 0 else 1.0) * term
    np.testing.assert_allclose(float(aux["bn"]), ref, rtol=1e-4)


def test_total_variation_matches_numpy():
    # DeepInversion's anisotropic L1 form of the one total variation (DISC uses its squared 4-direction form)
    from cfjax.methods.deep_inversion import total_variation

    x = np.random.default_rng(1).uniform(size=(2, 5, 6, 1)).astype(np.float32)
    ref = np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()
    np.testing.assert_allclose(float(total_variation(jnp.asarray(x), norm="l1", diagonals=False).mean()), ref, rtol=1e-5)
    per_image = np.abs(np.diff(x, axis=1)).mean((1, 2, 3)) + np.abs(np.diff(x, axis=2)).mean((1, 2, 3))
    np.testing.assert_allclose(np.asarray(total_variation(jnp.asarray(x), norm="l1", diagonals=False)), per_image, rtol=1e-5)


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_synthesize_optimises_the_inversion_objective():
    # Running statistics := those of 64 real digits (momentum 0), so the BN term is attainable.
    clf = ClassifierConfig(arch="cnn", width=4, hidden=8, bn_momentum=0.0)
    v = init_classifier(jax.random.PRNGKey(0), clf)
    real = jnp.asarray(load_dataset("mnist5k", "test").images[:64])
    _, stats = classifier_train_apply(clf)(v, real)
    v = {**v, "batch_stats": stats}
    apply_fn = classifier_apply(clf)
    cfg = syn.InversionConfig(steps=30, jitter=0)  # no jitter: the objective checked is the one optimised
    _, aux_real = syn.inversion_loss(apply_fn, v, cfg, real, jnp.zeros(64, jnp.int32))
    assert float(aux_real["bn"]) < 1e-3  # the real batch matches its own statistics
    images, targets, labels, summary = syn.synthesize(apply_fn, v, (28, 28, 1), 10, 12, batch_size=8, cfg=cfg, seed=0)
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(targets, np.arange(12) % 10)
    np.testing.assert_array_equal(labels, np.argmax(np.asarray(apply_fn(v, jnp.asarray(images))), -1))
    assert summary["target_agreement"] == pytest.approx(np.mean(labels == targets))
    # The objective is lower at the result than at starting noise.
    x0 = jnp.clip(cfg.init_mean + cfg.init_std * jax.random.normal(jax.random.PRNGKey(1), (8, 28, 28, 1)), 0, 1)
    y = jnp.asarray(targets[:8])
    before, _ = syn.inversion_loss(apply_fn, v, cfg, x0, y)
    after, _ = syn.inversion_loss(apply_fn, v, cfg, jnp.asarray(images[:8]), y)
    assert float(after) < 0.6 * float(before)
    mlp = ClassifierConfig(arch="mlp", hidden=8, depth=1)
    with pytest.raises(CfjaxError, match="BatchNorm"):
        syn.synthesize(classifier_apply(mlp), init_classifier(jax.random.PRNGKey(0), mlp), (28, 28, 1), 10, 4, batch_size=4, cfg=cfg)


# ---------------------------------------------------------------- shipped model


def test_shipped_duq_loads_and_is_accurate():
    from cfjax.pretrained import default_model_dir

    variables, config, info = td.load_duq(default_model_dir("duq", "mnist5k"))
    assert info["inference_only"] and info["source"] == "data"
    test = load_dataset("mnist5k", "test")
    k = td.duq_kernel_batched(variables, config, test.images)
    acc = float(np.mean(k.argmax(1) == test.labels))
    assert acc >= 0.95 and acc == pytest.approx(info["metrics"]["test_accuracy"], abs=1e-3)
    # More certain where it is right than where it is wrong, and on digits than on uniform noise.
    right = k.argmax(1) == test.labels
    assert k.max(1)[right].mean() > k.max(1)[~right].mean() + 0.2
    noise = np.random.default_rng(0).uniform(size=(100, 28, 28, 1)).astype(np.float32)
    assert k.max(1).mean() > td.duq_kernel_batched(variables, config, noise).max(1).mean() + 0.1
