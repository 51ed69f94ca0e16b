"""The BatchNorm classifier, its trainer (fit, checkpoints, resume, export), loader and CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax import checkpoint as ckpt
from cfjax.cli import main
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError, CheckpointError
from cfjax.models.classifier import (
    ARCHS,
    ClassifierConfig,
    classifier_apply,
    classifier_train_apply,
    has_batchnorm,
    init_classifier,
    predict_proba,
)
from cfjax.pipelines import train_classifier as tc
from cfjax.pipelines import training
from cfjax.pipelines.training import fit

TINY = ClassifierConfig(arch="cnn", width=4, hidden=8)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)).astype(np.float32)


# ---------------------------------------------------------------- config and model


def test_config_round_trip_and_validation():
    for arch in ARCHS:
        c = ClassifierConfig(arch=arch, width=8, hidden=16, depth=1)
        d = json.loads(json.dumps(c.to_dict()))
        assert ClassifierConfig.from_dict(d) == c
    with pytest.raises(CfjaxError, match="unknown classifier architecture 'vgg'"):
        ClassifierConfig(arch="vgg")
    with pytest.raises(CfjaxError, match="width"):
        ClassifierConfig(width=0)
    with pytest.raises(CfjaxError, match="not a classifier config"):
        ClassifierConfig.from_dict({"arch": "cnn", "levels": 3})
    with pytest.raises(CfjaxError, match="not a classifier config"):
        ClassifierConfig.from_dict({"width": 3})


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gives_logits(arch):
    c = ClassifierConfig(arch=arch, width=4, hidden=8, depth=1, num_classes=7)
    v = init_classifier(jax.random.PRNGKey(0), c)
    assert set(v) == ({"params"} if arch == "mlp" else {"params", "batch_stats"})
    assert has_batchnorm(v) == (arch != "mlp") == c.uses_batchnorm
    apply_fn = jax.jit(classifier_apply(c))  # one compile instead of one per primitive
    x = jnp.asarray(_images(5))
    logits = apply_fn(v, x)
    assert logits.shape == (5, 7) and np.all(np.isfinite(logits))
    # Batched evaluation is per example in eval mode: vmap over single images agrees.
    single = jax.vmap(lambda xi: apply_fn(v, xi[None])[0])(x)
    np.testing.assert_allclose(single, logits, rtol=1e-5, atol=1e-5)
    p = predict_proba(apply_fn, v, x)
    z = np.asarray(logits, np.float64)
    ref = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def _numpy_conv3x3_same(x, k):
    """x (B, H, W, Cin), k (3, 3, Cin, Cout): cross-correlation with zero padding."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, k.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,cd->bhwd", xp[:, i : i + h, j : j + w], k[i, j])
    return out


def test_batchnorm_running_statistics_update_matches_numpy():
    v = init_classifier(jax.random.PRNGKey(1), TINY)
    x = _images(6, seed=1)
    _, stats = classifier_train_apply(TINY)(v, jnp.asarray(x))
    h = _numpy_conv3x3_same(x.astype(np.float64), np.asarray(v["params"]["conv1"]["kernel"], np.float64))
    m = TINY.bn_momentum
    np.testing.assert_allclose(stats["bn1"]["mean"], m * 0.0 + (1 - m) * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["bn1"]["var"], m * 1.0 + (1 - m) * h.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # The other layers' statistics moved too; the parameters were not touched.
    for name in ("bn2", "bn3", "bn4", "bn5"):
        assert not np.allclose(stats[name]["mean"], 0.0)


def test_train_mode_uses_batch_statistics_and_eval_mode_running_ones():
    c = ClassifierConfig(arch="cnn", width=4, hidden=8, bn_momentum=0.0)  # running stats := batch stats
    v = init_classifier(jax.random.PRNGKey(2), c)
    apply_fn = classifier_apply(c)
    x = jnp.asarray(_images(8, seed=2))
    train_logits = apply_fn(v, x, train=True)
    # Train mode couples the examples of a batch; eval mode does not.
    x2 = x.at[1:].set(jnp.asarray(_images(7, seed=3)))
    assert not np.allclose(apply_fn(v, x2, train=True)[0], train_logits[0], atol=1e-4)
    np.testing.assert_allclose(apply_fn(v, x2)[0], apply_fn(v, x)[0], rtol=1e-6, atol=1e-6)
    # Eval mode with running statistics equal to this batch's statistics reproduces train mode.
    logits, stats = classifier_train_apply(c)(v, x)
    np.testing.assert_allclose(logits, train_logits, rtol=1e-6, atol=1e-6)
    eval_logits = apply_fn({**v, "batch_stats": stats}, x)
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-4, atol=1e-4)
    assert not np.allclose(apply_fn(v, x), train_logits, atol=1e-3)


@pytest.mark.parametrize("hw", [(28, 28), (7, 7), (6, 9)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_2x2_matches_flax_max_pool_values_and_gradients(hw, ties):
    """Same values and gradients as nn.max_pool (2x2, stride 2, VALID, computed by XLA through
    select-and-scatter), also with ties inside windows (inputs rounded to a few levels), where
    the gradient must go to one element per window, the first in row-major order."""
    import flax.linen as nn

    from cfjax.models.classifier import max_pool_2x2

    x = np.random.default_rng(1).standard_normal((3, *hw, 5))
    if ties:
        x = np.maximum(np.round(x), 0.0)  # ReLU-like: many equal values, zeros and positives
    x = jnp.asarray(x, jnp.float32)
    ref = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(ref))
    w = jnp.asarray(np.random.default_rng(2).standard_normal(ref.shape), jnp.float32)
    g = jax.grad(lambda a: jnp.sum(w * max_pool_2x2(a)))(x)
    g_ref = jax.grad(lambda a: jnp.sum(w * nn.max_pool(a, (2, 2), strides=(2, 2))))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))
    assert np.count_nonzero(np.asarray(g)) == ref.size  # exactly one element per window


def test_random_shift_is_a_zero_filled_translation():
    x = _images(16, seed=4)
    out = np.asarray(training.random_shift(jax.random.PRNGKey(0), jnp.asarray(x), 2))
    seen = set()
    for img, o in zip(x, out):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = np.zeros_like(img)
                src = img[max(0, -dy) : 28 - max(0, dy), max(0, -dx) : 28 - max(0, dx)]
                ref[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
                if np.array_equal(ref, o):
                    matches.append((dy, dx))
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 3  # offsets differ between examples
    np.testing.assert_array_equal(np.asarray(training.random_shift(jax.random.PRNGKey(0), jnp.asarray(x), 0)), x)


# ---------------------------------------------------------------- trainer, checkpoints, loader


@pytest.fixture(scope="module")
def small():
    tr = load_dataset("mnist5k", "train")
    te = load_dataset("mnist5k", "test")
    return (
        Dataset("mnist5k", "train", tr.images[:96], tr.labels[:96], 10),
        Dataset("mnist5k", "test", te.images[:50], te.labels[:50], 10),
    )


def _run(small, out, config=TINY, **kw):
    train, test = small
    spec = tc.build_spec(config, 3e-3, 6, seed=0)
    return fit(spec, train, test, out, epochs=2, batch_size=32, seed=0, checkpoint_every=2, quiet=True, **kw)


def test_fit_save_load_resume_and_export(small, tmp_path):
    full, metrics = _run(small, tmp_path / "full")
    apply_fn, variables, config, info = tc.load_classifier(tmp_path / "full")
    assert config == TINY and info["status"] == "complete" and info["kind"] == "classifier"
    assert set(variables) == {"params", "batch_stats"}
    for a, b in zip(_leaves(variables), _leaves(tc.variables_of(full))):
        np.testing.assert_array_equal(a, b)
    # The reported accuracy is the eval-mode accuracy of the loaded model on the test images.
    pred = np.argmax(np.asarray(apply_fn(variables, jnp.asarray(small[1].images))), -1)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(pred == small[1].labels))
    # Training moved both parameters and running statistics away from their initial values.
    init = init_classifier(jax.random.PRNGKey(0), TINY)
    assert not np.allclose(variables["params"]["conv1"]["kernel"], init["params"]["conv1"]["kernel"])
    assert not np.allclose(variables["batch_stats"]["bn1"]["mean"], 0.0)

    # Simulated kill after 3 of 6 steps, then --resume: same final state as the uninterrupted run.
    _, stopped = _run(small, tmp_path / "killed", max_steps=3)
    assert stopped == {"stopped_at_step": 3}
    with pytest.raises(CheckpointError, match="unfinished"):
        tc.load_classifier(tmp_path / "killed")
    with pytest.raises(CfjaxError, match="already holds a model"):
        _run(small, tmp_path / "killed")
    resumed, _ = _run(small, tmp_path / "killed", resume=True)
    for a, b in zip(_leaves(resumed), _leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # The inference-only export holds the same variables and no optimizer state.
    tc.export_inference_model(tmp_path / "full", tmp_path / "export")
    _, v2, c2, i2 = tc.load_classifier(tmp_path / "export")
    assert i2["inference_only"] and c2 == TINY
    for a, b in zip(_leaves(v2), _leaves(variables)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CfjaxError, match="already holds a model"):
        tc.export_inference_model(tmp_path / "full", tmp_path / "export")


def test_mlp_trains_without_batch_stats(small, tmp_path):
    cfg = ClassifierConfig(arch="mlp", hidden=16, depth=1)
    state, _ = _run(small, tmp_path / "mlp", config=cfg)
    assert "batch_stats" not in state
    _, variables, config, _ = tc.load_classifier(tmp_path / "mlp")
    assert config == cfg and set(variables) == {"params"}


def test_loader_rejects_missing_foreign_and_corrupt_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tc.load_classifier(tmp_path / "nope")
    flow = tmp_path / "flow"
    ckpt.write_model_info(flow, "flow", {"glow": {}}, status="complete")
    with pytest.raises(CheckpointError, match="holds a 'flow' model, but a 'classifier' model is needed"):
        tc.load_classifier(flow)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ckpt.MODEL_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        tc.load_classifier(bad)
    foreign_cfg = tmp_path / "cfg"
    ckpt.write_model_info(foreign_cfg, "classifier", {"arch": "cnn", "levels": 2}, status="complete")
    with pytest.raises(CheckpointError, match="not a classifier config"):
        tc.load_classifier(foreign_cfg)
    # A checkpoint of another architecture under a classifier config.
    other = tmp_path / "other"
    ckpt.write_model_info(other, "classifier", TINY.to_dict(), status="complete", inference_only=True)
    ckpt.save_checkpoint(other, 1, init_classifier(jax.random.PRNGKey(0), ClassifierConfig(arch="cnn", width=6, hidden=8)))
    with pytest.raises(CheckpointError, match="architecture"):
        tc.load_classifier(other)


# ---------------------------------------------------------------- shipped models


@pytest.mark.parametrize("kind, arch, min_acc", [("classifier", "cnn", 0.98), ("oracle", None, 0.97)])
def test_shipped_models_load_and_are_accurate(kind, arch, min_acc):
    from cfjax.pretrained import default_model_dir

    apply_fn, variables, config, info = tc.load_classifier(default_model_dir(kind, "mnist5k"))
    assert info["inference_only"] and config.image_shape == (28, 28, 1)
    if arch:
        assert config.arch == arch and has_batchnorm(variables)
    test = load_dataset("mnist5k", "test")
    pred = np.argmax(np.asarray(jax.jit(apply_fn)(variables, jnp.asarray(test.images))), -1)
    acc = float(np.mean(pred == test.labels))
    assert acc >= min_acc
    assert acc == pytest.approx(info["metrics"]["test_accuracy"], abs=1e-3)


def test_oracle_is_independent_of_the_classifier():
    from cfjax.pretrained import default_model_dir

    _, _, c1, i1 = tc.load_classifier(default_model_dir("classifier", "mnist5k"))
    _, _, c2, i2 = tc.load_classifier(default_model_dir("oracle", "mnist5k"))
    assert c1.arch != c2.arch and i1["train_settings"]["seed"] != i2["train_settings"]["seed"]


# ---------------------------------------------------------------- CLI


def _cli(capsys, *args):
    code = main(["train", "classifier", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_inputs_one_line_exit_2(capsys, tmp_path):
    out = str(tmp_path / "m")
    code, err = _cli(capsys, "--out", out, "--arch", "vgg")
    assert code == 2 and err == "cfjax: error: unknown classifier architecture 'vgg': choose one of cnn, resnet, mlp"
    code, err = _cli(capsys, "--out", out, "--epochs", "0")
    assert code == 2 and err == "cfjax: error: --epochs must be a positive integer, got 0"
    assert not (tmp_path / "m").exists()  # nothing written for bad options
    ckpt.write_model_info(tmp_path / "m", "classifier", TINY.to_dict(), status="complete")
    code, err = _cli(capsys, "--out", out, "--epochs", "1")
    assert code == 2 and "already holds a model: pass --resume" in err and "\n" not in err


def test_cli_loading_a_flow_dir_as_classifier_is_one_line(tmp_path):
    flow = tmp_path / "flow"
    ckpt.write_model_info(flow, "flow", {"glow": {}}, status="complete")
    p = subprocess.run(
        [sys.executable, "-m", "cfjax.cli", "train", "duq", "--out", str(tmp_path / "d"), "--source", "inversion", "--classifier", str(flow)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == f"cfjax: error: {flow} holds a 'flow' model, but a 'classifier' model is needed here"
