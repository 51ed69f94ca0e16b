"""The flow trainer: a short run, checkpoint round trip, resume after a kill, export."""

import functools
import jax
import numpy as np
import pytest

from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError, CheckpointError
from cfjax.models import flow_classifier as fc
from cfjax.models.glow import GlowConfig
from cfjax.models.latent import LatentConfig
from cfjax.pipelines import train_flow
from cfjax.pipelines.training import fit

CFG = fc.FlowClassifierConfig(
    glow=GlowConfig(image_shape=(28, 28, 1), num_levels=2, steps_per_level=1, hidden_channels=8, max_hidden_channels=8),
    latent=LatentConfig(num_classes=10, beta=4.0),
)


@pytest.fixture(scope="module")
def small():
    tr = load_dataset("mnist5k", "train")
    te = load_dataset("mnist5k", "test")
    return Dataset("mnist5k", "train", tr.images[:96], tr.labels[:96], 10), Dataset("mnist5k", "test", te.images[:50], te.labels[:50], 10)


def _run(small, out, augment_shift=0, **kw):
    train, test = small
    spec = train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, augment_shift=augment_shift)
    return fit(spec, train, test, out, epochs=2, batch_size=32, seed=0, checkpoint_every=2, quiet=True, **kw)


def _leaves(p):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(p)]


def test_train_save_load_and_resume_matches_uninterrupted(small, tmp_path):
    full_state, metrics = _run(small, tmp_path / "full")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_bits_per_dim"])
    params, config, info = train_flow.load_flow(tmp_path / "full")
    assert config == CFG and info["status"] == "complete"
    for a, b in zip(_leaves(params), _leaves(full_state["params"])):
        np.testing.assert_array_equal(a, b)
    # The class means are the mean latents of the training images per predicted class.
    z, _ = fc.encode(params, CFG, small[0].images)
    pred = np.asarray(np.argmax(fc.class_logits(params, CFG, small[0].images), -1))
    for c in np.unique(pred):
        np.testing.assert_allclose(np.asarray(params["class_means"][c]), np.asarray(z)[pred == c].mean(0), atol=2e-4)

    # Simulated kill after 3 of 6 steps, then --resume.
    _, stopped = _run(small, tmp_path / "killed", max_steps=3)
    assert stopped == {"stopped_at_step": 3}
    with pytest.raises(CheckpointError, match="unfinished"):
        train_flow.load_flow(tmp_path / "killed")
    with pytest.raises(CfjaxError, match="already holds a model"):
        _run(small, tmp_path / "killed")
    resumed, _ = _run(small, tmp_path / "killed", resume=True)
    for a, b in zip(_leaves(resumed["params"]), _leaves(full_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Inference-only export loads to the same parameters and is smaller.
    train_flow.export_inference_model(tmp_path / "full", tmp_path / "export")
    p2, c2, i2 = train_flow.load_flow(tmp_path / "export")
    assert i2["inference_only"] and c2 == CFG
    for a, b in zip(_leaves(p2), _leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_resume_without_checkpoint_and_bad_settings(small, tmp_path):
    with pytest.raises(CfjaxError, match="no checkpoint to resume"):
        _run(small, tmp_path / "empty", resume=True)
    train, test = small
    spec = train_flow.build_spec(CFG, train, 1e-3, 6, seed=0)
    with pytest.raises(CfjaxError, match="epochs"):
        fit(spec, train, test, tmp_path / "x", epochs=0, batch_size=32)
    with pytest.raises(CfjaxError, match="larger than the training set"):
        fit(spec, train, test, tmp_path / "x", epochs=1, batch_size=1000)


def test_augment_shift_trains_on_shifted_images_and_is_kept_on_resume(small, tmp_path, monkeypatch):
    """--augment-shift: the loss sees randomly translated images (checked by recording them), the
    setting is recorded, and --resume refuses a different value."""
    from cfjax.pipelines import training

    seen = []
    real = training.random_shift

    def recording(key, x, max_shift):
        out = real(key, x, max_shift)
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, out)
        return out

    monkeypatch.setattr(train_flow, "random_shift", recording)
    _, stopped = _run(small, tmp_path / "aug", augment_shift=2, max_steps=2)
    assert stopped == {"stopped_at_step": 2} and len(seen) == 2
    for x, out in seen:
        assert x.shape == out.shape == (32, 28, 28, 1)
        assert not np.array_equal(x, out)  # some images moved
        np.testing.assert_allclose(out.sum(), x.sum(), rtol=0.05)  # a translation, not a rescale (digits sit inside the frame)
    assert train_flow.ckpt.read_model_info(tmp_path / "aug", expected_kind="flow")["augment_shift"] == 2
    with pytest.raises(CfjaxError, match="augment_shift=2"):
        _run(small, tmp_path / "aug", augment_shift=0, resume=True)
    with pytest.raises(CfjaxError, match="augment_shift"):
        train_flow.build_spec(CFG, small[0], 1e-3, 6, seed=0, augment_shift=-1)


def test_augment_affine_trains_on_warped_images_and_is_kept_on_resume(small, tmp_path, monkeypatch):
    """--augment-rotate / --augment-scale: the loss sees the warped images (recorded), both settings
    are recorded in the model directory and --resume refuses other values."""
    seen = []
    real = train_flow.random_affine

    def recording(key, x, max_rotate, max_scale):
        out = real(key, x, max_rotate, max_scale)
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, out)
        return out

    monkeypatch.setattr(train_flow, "random_affine", recording)
    train, test = small

    def run(out, rotate, scale, **kw):
        spec = train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, augment_rotate=rotate, augment_scale=scale)
        return fit(spec, train, test, out, epochs=2, batch_size=32, seed=0, checkpoint_every=2, quiet=True, **kw)

    _, stopped = run(tmp_path / "aff", 15.0, 0.1, max_steps=2)
    assert stopped == {"stopped_at_step": 2} and len(seen) == 2
    for x, out in seen:
        assert x.shape == out.shape == (32, 28, 28, 1) and not np.array_equal(x, out)
        assert out.min() >= 0.0 and out.max() <= 1.0  # bilinear resampling stays in the pixel range
    info = train_flow.ckpt.read_model_info(tmp_path / "aff", expected_kind="flow")
    assert (info["augment_rotate"], info["augment_scale"]) == (15.0, 0.1)
    with pytest.raises(CfjaxError, match="augment_rotate=15.0"):
        run(tmp_path / "aff", 0.0, 0.1, resume=True)
    with pytest.raises(CfjaxError, match="augment_rotate"):
        train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, augment_rotate=95.0)


def test_init_from_starts_at_the_trained_weights_and_refuses_another_network(small, tmp_path):
    """--init-from: the new run starts exactly at the trained flow's parameters (a near-zero
    learning rate leaves them there), records where it came from, and a different network is
    refused by name."""
    import dataclasses

    from cfjax.cli import main

    _run(small, tmp_path / "a")
    trained, _, _ = train_flow.load_flow(tmp_path / "a")
    init, record = train_flow.warm_start_params(tmp_path / "a", CFG)
    assert record["init_from"] == str(tmp_path / "a")
    train, test = small
    spec = train_flow.build_spec(CFG, train, 1e-12, 3, seed=1, init_params=init, info=record)
    state, _ = fit(spec, train, test, tmp_path / "b", epochs=1, batch_size=32, seed=1, quiet=True)
    for name in ("glow", "latent"):
        for a, b in zip(_leaves(state["params"][name]), _leaves(trained[name])):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert train_flow.ckpt.read_model_info(tmp_path / "b", expected_kind="flow")["init_from"] == str(tmp_path / "a")
    # A fresh initialisation is far from it (the check above can fail).
    fresh = fc.init_flow_classifier(jax.random.PRNGKey(1), CFG, train.images[:32])
    assert max(float(np.abs(a - b).max()) for a, b in zip(_leaves(fresh["glow"]), _leaves(trained["glow"]))) > 1e-2

    # A warm-started run killed part way continues from its own checkpoint with --resume (not from
    # the weights it started at) and ends where the uninterrupted warm-started run ends.
    spec = train_flow.build_spec(CFG, train, 1e-3, 4, seed=1, init_params=init, info=record)
    run = functools.partial(fit, spec, train, test, epochs=2, batch_size=32, seed=1, checkpoint_every=2, quiet=True)
    whole, _ = run(tmp_path / "w")
    _, stopped = run(tmp_path / "k", max_steps=2)
    assert stopped == {"stopped_at_step": 2}
    resumed, _ = run(tmp_path / "k", resume=True)
    for a, b in zip(_leaves(resumed["params"]), _leaves(whole["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(_leaves(whole["params"]["glow"]), _leaves(trained["glow"]))) > 1e-6
    assert train_flow.ckpt.read_model_info(tmp_path / "k", expected_kind="flow")["init_from"] == str(tmp_path / "a")

    wider = dataclasses.replace(CFG, glow=dataclasses.replace(CFG.glow, hidden_channels=16, max_hidden_channels=16))
    with pytest.raises(CfjaxError, match="different network.*hidden_channels"):
        train_flow.warm_start_params(tmp_path / "a", wider)
    assert main(["train", "flow", "--out", str(tmp_path / "d"), "--init-from", str(tmp_path / "missing"), "--quiet"]) == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_ema_ships_the_weight_average_and_survives_resume(small, tmp_path, monkeypatch):
    """--ema: the shipped weights are the exponential moving average of the per-step weights,
    recomputed here in NumPy from weights recorded at every step (the decay warms up as
    min(d, (1 + k) / (10 + k))); class means are those of the average; the last step's weights
    are kept as ``online_params``; a killed and resumed run ships the same average; --resume
    refuses another decay; a decay outside (0, 1) is refused."""
    train, test = small
    decay = 0.8
    seen = []
    real_update = train_flow.ema_update

    def recording(average, params, count, d):
        jax.debug.callback(lambda *g: seen.append([np.asarray(a, np.float64) for a in g]), *jax.tree_util.tree_leaves(params["glow"]))
        return real_update(average, params, count, d)

    monkeypatch.setattr(train_flow, "ema_update", recording)

    def run(out, **kw):
        spec = train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, ema=decay)
        return fit(spec, train, test, out, epochs=2, batch_size=32, seed=0, checkpoint_every=2, quiet=True, **kw)

    init = fc.init_flow_classifier(jax.random.PRNGKey(0), CFG, train_flow._init_batch(train.images, seed=0))
    state, _ = run(tmp_path / "ema")
    assert len(seen) == 6
    expect = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(init["glow"])]
    for k, step_params in enumerate(seen):
        d = min(decay, (1 + k) / (10 + k))
        expect = [d * a + (1 - d) * p for a, p in zip(expect, step_params)]
    params, _, info = train_flow.load_flow(tmp_path / "ema")
    assert info["ema"] == decay
    got = _leaves(params["glow"])
    for a, b in zip(got, expect):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    last = [np.asarray(a) for a in jax.tree_util.tree_leaves(state["online_params"]["glow"])]
    for a, b in zip(last, seen[-1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, last)) > 1e-4  # the average is not the last step
    z, _ = fc.encode(params, CFG, train.images)
    pred = np.asarray(np.argmax(fc.class_logits(params, CFG, train.images), -1))
    for c in np.unique(pred):
        np.testing.assert_allclose(np.asarray(params["class_means"][c]), np.asarray(z)[pred == c].mean(0), atol=2e-4)

    _, stopped = run(tmp_path / "killed", max_steps=3)
    assert stopped == {"stopped_at_step": 3}
    run(tmp_path / "killed", resume=True)
    resumed, _, _ = train_flow.load_flow(tmp_path / "killed")
    for a, b in zip(_leaves(resumed["glow"]), got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(CfjaxError, match="ema=0.8"):
        fit(train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, ema=0.9), train, test, tmp_path / "killed",
            epochs=2, batch_size=32, seed=0, resume=True, quiet=True)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(CfjaxError, match="ema must be"):
            train_flow.build_spec(CFG, train, 1e-3, 6, seed=0, ema=bad)


def test_cli_refuses_an_ema_decay_of_one_before_any_work(tmp_path, capsys):
    from cfjax.cli import main

    assert main(["train", "flow", "--out", str(tmp_path / "m"), "--ema", "1", "--quiet"]) == 2
    assert "ema must be" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
