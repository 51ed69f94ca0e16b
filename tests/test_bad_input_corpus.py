"""Bad-input corpus: malformed calls across the CLI and the Python API.

Every CLI case must end with exit code 2 and exactly one stderr line ``cfjax: error: ...`` that
names the problem (a keyword is asserted), no traceback, and no output file created (or an
existing one left byte-identical). Every API case must raise CfjaxError (a ValueError) whose
message names the problem. Damaged model directories are copies of the shipped ones, damaged in
tmp_path. Most cases fail in validation before any model is compiled, which keeps this file fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cfjax.cli import main
from cfjax.errors import CfjaxError
from cfjax.pretrained import PRETRAINED_DIR

# Orbax leaves an asyncio callback behind after a failed restore; pytest reports it as an
# "unraisable" warning. A real `cfjax` process prints nothing for it (checked: one stderr line).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FLOW = PRETRAINED_DIR / "mnist5k_glow_flow"  # checkpoint-damage cases: any flow architecture serves
CLF = PRETRAINED_DIR / "mnist5k_classifier"
DUQ = PRETRAINED_DIR / "mnist5k_duq"


# --------------------------------------------------------------------------------------------
# fixtures: files and damaged model directories (built once per module in a temp directory)


def _cf_arrays(n=4, h=28, w=28, c=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, h, w, c)).astype(np.float32)
    x_cf = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    return {"x": x, "x_cf": x_cf, "y": y, "y_pred": y, "y_target": (y + 1) % 10, "y_cf_pred": (y + 1) % 10}


def _truncate_biggest_file(root: Path) -> None:
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    big = files[-1]
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 3])


def _garble_array_files(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"\x00garbage" * 16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files and damaged model copies shared by the cases: {name: Path}."""
    t = tmp_path_factory.mktemp("corpus")
    w = {"tmp": t}

    def copy(src, name):
        dst = t / name
        shutil.copytree(src, dst)
        return dst

    # model directories ------------------------------------------------------------------
    d = copy(FLOW, "corrupt_json")
    (d / "cfjax_model.json").write_text('{"kind": "flow", "config": {')
    w["corrupt_json"] = d

    d = copy(FLOW, "no_kind")
    (d / "cfjax_model.json").write_text(json.dumps({"format": 1}))
    w["no_kind"] = d

    d = copy(FLOW, "no_checkpoints")
    shutil.rmtree(d / "checkpoints")
    w["no_checkpoints"] = d

    d = copy(FLOW, "no_steps")  # a run killed before its first save: empty checkpoints/
    for step in (d / "checkpoints").iterdir():
        shutil.rmtree(step)
    w["no_steps"] = d

    d = copy(FLOW, "truncated")
    _truncate_biggest_file(d / "checkpoints")
    w["truncated"] = d

    d = copy(FLOW, "garbled")
    _garble_array_files(d / "checkpoints")
    w["garbled"] = d

    d = copy(FLOW, "partial_state")  # the state item of the step is gone, metadata remains
    for step in (d / "checkpoints").iterdir():
        shutil.rmtree(step / "state")
    w["partial_state"] = d

    d = copy(FLOW, "other_arch")  # the config says another architecture than the saved weights
    info = json.loads((d / "cfjax_model.json").read_text())
    info["config"]["glow"]["hidden_channels"] = 8
    info["config"]["glow"]["max_hidden_channels"] = 16
    (d / "cfjax_model.json").write_text(json.dumps(info))
    w["other_arch"] = d

    d = copy(FLOW, "unfinished")
    info = json.loads((d / "cfjax_model.json").read_text())
    info["status"] = "running"
    (d / "cfjax_model.json").write_text(json.dumps(info))
    w["unfinished"] = d

    d = t / "not_a_model"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x01\x02")
    w["not_a_model"] = d

    # CF.npz files ---------------------------------------------------------------------------
    def npz(name, **arrays):
        p = t / name
        np.savez(p, **arrays)
        w[name] = p

    base = _cf_arrays()
    npz("good.npz", **base)
    npz("missing_keys.npz", **{k: v for k, v in base.items() if k not in ("y_cf_pred", "y_target")})
    npz("nan.npz", **{**base, "x_cf": np.where(np.arange(28)[None, :, None, None] == 3, np.nan, base["x_cf"]).astype(np.float32)})
    npz("inf.npz", **{**base, "x": np.full_like(base["x"], np.inf)})
    npz("uint8.npz", **{**base, "x": (base["x"] * 255).astype(np.uint8)})
    npz("float_labels.npz", **{**base, "y": base["y"].astype(np.float32)})
    npz("negative_class.npz", **{**base, "y_target": base["y_target"] - 5})
    npz("class_12.npz", **{**base, "y_target": np.full(4, 12, np.int32)})
    npz("shape_mismatch.npz", **{**base, "x_cf": base["x_cf"][:, :20]})
    npz("flat.npz", **{**base, "x": base["x"].reshape(4, -1), "x_cf": base["x_cf"].reshape(4, -1)})
    npz("labels_short.npz", **{**base, "y_pred": base["y_pred"][:2]})
    npz("empty.npz", **{k: v[:0] for k, v in base.items()})
    npz("bad_heatmap.npz", **base, heatmap=np.zeros((4, 14, 14), np.float32))
    npz("bad_seconds.npz", **base, seconds=np.float32(-1.0))
    npz("rgb_32.npz", **_cf_arrays(h=32, w=32, c=3))
    p = t / "text.npz"
    p.write_text("this is not a zip archive\n")
    w["text.npz"] = p
    p = t / "truncated.npz"
    raw = (t / "good.npz").read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    w["truncated.npz"] = p

    # paths ---------------------------------------------------------------------------------
    w["a_file"] = t / "a_file.txt"
    w["a_file"].write_text("I am a file, not a directory\n")
    w["a_dir"] = t / "a_dir"
    w["a_dir"].mkdir()
    w["full_dir"] = t / "full_dir"          # an existing, non-empty, non-shard directory
    w["full_dir"].mkdir()
    (w["full_dir"] / "notes.txt").write_text("someone else's file\n")
    w["existing_json"] = t / "existing.json"
    w["existing_json"].write_text('{"keep": "me"}\n')
    w["existing_npz"] = t / "existing.npz"
    shutil.copy(t / "good.npz", w["existing_npz"])
    return w


def _resolve(arg, world):
    """'@name' -> the fixture path; 'OUT' -> a fresh path that must not be created."""
    if isinstance(arg, str) and arg.startswith("@"):
        head, _, tail = arg[1:].partition("/")
        p = world[head]
        return str(p / tail) if tail else str(p)
    return arg


def _files_under(root: Path) -> set:
    return {p for p in root.rglob("*")}


def run_cli(capsys, argv, keyword, watch=()):
    """Run the CLI in-process; assert exit 2, one ``cfjax: error:`` line naming ``keyword``."""
    before = {Path(p): (Path(p).read_bytes() if Path(p).is_file() else None) for p in watch}
    capsys.readouterr()
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr {cap.err!r}"
    assert "Traceback" not in cap.err + cap.out
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("cfjax: error: "), lines[0]
    assert keyword.lower() in lines[0].lower(), f"{keyword!r} not in {lines[0]!r}"
    for p, data in before.items():
        if data is None:
            assert not p.exists(), f"{p} was created by a failing command"
        else:
            assert p.read_bytes() == data, f"{p} was modified by a failing command"
    return lines[0]


# --------------------------------------------------------------------------------------------
# CLI cases: (id, argv, keyword). OUT is the output path that must not appear.

CLI_CASES = [
    # argument parsing (now one line, like every other error)
    ("unknown-method", ["explain", "lime", "--out", "OUT"], "invalid choice"),
    ("unknown-train-kind", ["train", "gan", "--out", "OUT"], "invalid choice"),
    ("batch-size-abc", ["explain", "ecinn", "--out", "OUT", "--batch-size", "abc"], "--batch-size"),
    ("missing-out", ["explain", "ecinn"], "--out"),
    ("refine-not-int", ["explain", "ecinn", "--out", "OUT", "--refine", "1.5"], "--refine"),
    # queries and targets
    ("limit-0", ["explain", "ecinn", "--out", "OUT", "--limit", "0"], "--limit"),
    ("limit-abc", ["explain", "ecinn", "--out", "OUT", "--limit", "abc"], "--limit"),
    ("limit-negative", ["explain", "disc", "--out", "OUT", "--limit", "-3"], "--limit"),
    ("unknown-dataset", ["explain", "ecinn", "--out", "OUT", "--data", "nosuchdata_xyz"], "nosuchdata_xyz"),
    ("empty-dataset-name", ["explain", "ecinn", "--out", "OUT", "--data", ""], "dataset"),
    ("unknown-split", ["explain", "ecinn", "--out", "OUT", "--split", "validation"], "split"),
    ("tfds-not-prepared", ["explain", "ecinn", "--out", "OUT", "--data", "fashion_mnist", "--data-dir", "@a_dir"], "fashion_mnist"),
    ("target-out-of-range", ["explain", "ecinn", "--out", "OUT", "--target", "10"], "outside"),
    ("target-negative", ["explain", "ecinn", "--out", "OUT", "--target", "-1"], "outside"),
    ("target-word", ["explain", "ecinn", "--out", "OUT", "--target", "previous"], "--target"),
    ("batch-size-0", ["explain", "ecinn", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    ("unknown-step", ["explain", "ecinn", "--out", "OUT", "--step", "giant"], "step rule"),
    ("refine-negative", ["explain", "ecinn", "--out", "OUT", "--refine", "-1"], "--refine"),
    ("residual-above-1", ["explain", "ecinn", "--out", "OUT", "--residual", "1.5"], "--residual must be a number in [0, 1]"),
    ("residual-word", ["explain", "ecinn", "--out", "OUT", "--residual", "half"], "--residual must be a number in [0, 1]"),
    # output paths
    ("out-dir-missing", ["explain", "ecinn", "--out", "@a_dir/missing/cf.npz"], "does not exist"),
    # an existing directory means sharded output (explain_common): a foreign, non-empty one is refused
    ("out-is-foreign-dir", ["explain", "ecinn", "--out", "@full_dir"], "not empty"),
    ("out-is-foreign-dir-resume", ["explain", "ecinn", "--out", "@full_dir", "--resume"], "not a cfjax shard directory"),
    ("out-under-a-file", ["explain", "ecinn", "--out", "@a_file/cf.npz"], "not a directory"),
    ("png-dir-missing", ["explain", "ecinn", "--out", "OUT", "--png", "@a_dir/nope/g.png"], "--png"),
    # model directories (explain ecinn)
    ("model-missing", ["explain", "ecinn", "--out", "OUT", "--model", "@a_dir/nothing_here"], "does not exist"),
    ("model-is-file", ["explain", "ecinn", "--out", "OUT", "--model", "@a_file"], "not a directory"),
    ("model-not-cfjax", ["explain", "ecinn", "--out", "OUT", "--model", "@not_a_model"], "not a cfjax model"),
    ("model-corrupt-json", ["explain", "ecinn", "--out", "OUT", "--model", "@corrupt_json"], "corrupt"),
    ("model-json-no-kind", ["explain", "ecinn", "--out", "OUT", "--model", "@no_kind"], "corrupt"),
    ("model-foreign-classifier", ["explain", "ecinn", "--out", "OUT", "--model", str(CLF)], "'classifier' model"),
    ("model-no-checkpoints", ["explain", "ecinn", "--out", "OUT", "--model", "@no_checkpoints"], "no saved checkpoint"),
    ("model-no-steps", ["explain", "ecinn", "--out", "OUT", "--model", "@no_steps"], "no complete checkpoint"),
    ("model-truncated", ["explain", "ecinn", "--out", "OUT", "--model", "@truncated"], "corrupt"),
    ("model-garbled", ["explain", "ecinn", "--out", "OUT", "--model", "@garbled"], "corrupt"),
    ("model-partial-state", ["explain", "ecinn", "--out", "OUT", "--model", "@partial_state"], "checkpoint"),
    ("model-other-arch", ["explain", "ecinn", "--out", "OUT", "--model", "@other_arch"], "architecture"),
    ("model-unfinished", ["explain", "ecinn", "--out", "OUT", "--model", "@unfinished"], "unfinished"),
    # explain disc
    ("disc-unknown-prior", ["explain", "disc", "--out", "OUT", "--prior", "gan"], "prior"),
    ("disc-steps-0", ["explain", "disc", "--out", "OUT", "--steps", "0"], "--steps"),
    ("disc-unknown-manifold", ["explain", "disc", "--out", "OUT", "--manifold", "vae"], "--manifold"),
    ("disc-bn-convention", ["explain", "disc", "--out", "OUT", "--bn-convention", "channel"], "bn"),
    ("disc-bn-weight-negative", ["explain", "disc", "--out", "OUT", "--bn-weight", "-1"], "--bn-weight"),
    ("disc-l1-weight-nan", ["explain", "disc", "--out", "OUT", "--l1-weight", "nan"], "--l1-weight"),
    ("disc-tv-weight-inf", ["explain", "disc", "--out", "OUT", "--tv-weight", "inf"], "--tv-weight"),
    ("disc-l2-weight-negative", ["explain", "disc", "--out", "OUT", "--l2-weight", "-0.1"], "--l2-weight"),
    ("disc-ink-weight-nan", ["explain", "disc", "--out", "OUT", "--ink-weight", "nan"], "--ink-weight"),
    ("disc-keep-ink-weight-negative", ["explain", "disc", "--out", "OUT", "--keep-ink-weight", "-2"], "--keep-ink-weight"),
    ("disc-mc-weight-negative", ["explain", "disc", "--out", "OUT", "--mc-weight", "-0.5"], "--mc-weight"),
    ("disc-jitter-negative", ["explain", "disc", "--out", "OUT", "--jitter", "-1"], "--jitter"),
    ("disc-jitter-fraction", ["explain", "disc", "--out", "OUT", "--jitter", "1.5"], "--jitter"),
    ("disc-batch-size-0", ["explain", "disc", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    ("disc-foreign-flow", ["explain", "disc", "--out", "OUT", "--model", str(FLOW)], "'flow' model"),
    ("disc-foreign-duq", ["explain", "disc", "--out", "OUT", "--duq", str(CLF)], "'classifier' model"),
    ("disc-no-duq-for-data", ["explain", "disc", "--out", "OUT", "--data", "fakemnist5k"], "no shipped"),
    ("disc-out-under-a-file", ["explain", "disc", "--out", "@a_file/cf.npz"], "not a directory"),
    # evaluate
    ("eval-missing-file", ["evaluate", "@a_dir/none.npz", "--json", "OUT"], "does not exist"),
    ("eval-missing-keys", ["evaluate", "@missing_keys.npz", "--json", "OUT"], "missing key"),
    ("eval-not-npz", ["evaluate", "@text.npz", "--json", "OUT"], "not a readable"),
    ("eval-truncated-npz", ["evaluate", "@truncated.npz", "--json", "OUT"], "not a readable"),
    ("eval-nan", ["evaluate", "@nan.npz", "--json", "OUT"], "nan"),
    ("eval-inf", ["evaluate", "@inf.npz", "--json", "OUT"], "infinite"),
    ("eval-uint8", ["evaluate", "@uint8.npz", "--json", "OUT"], "dtype"),
    ("eval-float-labels", ["evaluate", "@float_labels.npz", "--json", "OUT"], "integer"),
    ("eval-negative-class", ["evaluate", "@negative_class.npz", "--json", "OUT"], "negative"),
    ("eval-class-12", ["evaluate", "@class_12.npz", "--json", "OUT", "--oracle", "none", "--flow", "none"], "class 12"),
    ("eval-shape-mismatch", ["evaluate", "@shape_mismatch.npz", "--json", "OUT"], "x_cf"),
    ("eval-flat-images", ["evaluate", "@flat.npz", "--json", "OUT"], "(N, H, W, C)"),
    ("eval-labels-short", ["evaluate", "@labels_short.npz", "--json", "OUT"], "y_pred"),
    ("eval-empty", ["evaluate", "@empty.npz", "--json", "OUT"], "no counterfactuals"),
    ("eval-bad-heatmap", ["evaluate", "@bad_heatmap.npz", "--json", "OUT"], "heatmap"),
    ("eval-bad-seconds", ["evaluate", "@bad_seconds.npz", "--json", "OUT"], "seconds"),
    ("eval-wrong-data-shape", ["evaluate", "@rgb_32.npz", "--json", "OUT"], "(32, 32, 3)"),
    ("eval-batch-size-0", ["evaluate", "@good.npz", "--json", "OUT", "--batch-size", "0"], "--batch-size"),
    ("eval-pca-k-0", ["evaluate", "@good.npz", "--json", "OUT", "--oracle", "none", "--flow", "none", "--pca-k", "0"], "--pca-k"),
    ("eval-json-dir-missing", ["evaluate", "@good.npz", "--json", "@a_dir/nope/m.json"], "does not exist"),
    ("eval-json-is-dir", ["evaluate", "@good.npz", "--json", "@a_dir"], "is a directory"),
    ("eval-oracle-is-duq", ["evaluate", "@good.npz", "--json", "OUT", "--data", "none", "--oracle", str(DUQ)], "'duq' model"),
    ("eval-flow-is-classifier", ["evaluate", "@good.npz", "--json", "OUT", "--data", "none", "--oracle", "none", "--flow", str(CLF)], "not a flow"),
    ("eval-oracle-corrupt", ["evaluate", "@good.npz", "--json", "OUT", "--data", "none", "--oracle", "@corrupt_json"], "corrupt"),
    # train
    ("train-flow-epochs-0", ["train", "flow", "--data", "mnist5k", "--out", "OUT", "--epochs", "0"], "epochs"),
    ("train-flow-batch-0", ["train", "flow", "--data", "mnist5k", "--out", "OUT", "--batch-size", "0"], "batch"),
    ("train-flow-unfolded-noise-logit", ["train", "flow", "--arch", "ibinn-small", "--data", "mnist5k", "--out", "OUT",
                                         "--preprocess", "logit", "--noise-boundary", "none"], "logit"),
    ("train-flow-rotate-90", ["train", "flow", "--data", "mnist5k", "--out", "OUT", "--augment-rotate", "90"], "augment_rotate"),
    ("train-flow-scale-1", ["train", "flow", "--data", "mnist5k", "--out", "OUT", "--augment-scale", "1"], "augment_scale"),
    ("train-flow-unknown-data", ["train", "flow", "--data", "nosuchdata_xyz", "--out", "OUT"], "nosuchdata_xyz"),
    ("train-flow-resume-nothing", ["train", "flow", "--out", "OUT", "--resume"], "resume"),
    ("train-classifier-arch", ["train", "classifier", "--out", "OUT", "--arch", "vgg"], "vgg"),
    ("train-duq-source", ["train", "duq", "--out", "OUT", "--source", "internet"], "internet"),
    # --export into a directory that already holds a model: refused before any training
    ("train-flow-export-taken", ["train", "flow", "--out", "OUT", "--export", "@other_arch"], "already holds a model"),
    ("train-classifier-export-taken", ["train", "classifier", "--out", "OUT", "--export", "@other_arch"], "already holds a model"),
    ("train-duq-export-taken", ["train", "duq", "--out", "OUT", "--export", "@other_arch"], "already holds a model"),
]


@pytest.mark.parametrize("argv,keyword", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(argv, keyword, world, capsys, tmp_path):
    out = tmp_path / "out_product"
    argv = [str(out) if a == "OUT" else _resolve(a, world) for a in argv]
    before = _files_under(world["tmp"])
    run_cli(capsys, argv, keyword, watch=[out])
    after = _files_under(world["tmp"])
    assert after == before, f"files appeared or vanished: {sorted(map(str, after ^ before))}"


def test_cli_corpus_is_large_enough():
    assert len(CLI_CASES) >= 30


# Existing outputs must survive a failing run byte for byte.
KEEP_CASES = [
    ("explain-bad-step-keeps-npz", ["explain", "ecinn", "--out", "@existing_npz", "--step", "giant"], "step rule", "existing_npz"),
    ("explain-bad-model-keeps-npz", ["explain", "ecinn", "--out", "@existing_npz", "--model", "@truncated"], "corrupt", "existing_npz"),
    ("disc-bad-prior-keeps-npz", ["explain", "disc", "--out", "@existing_npz", "--prior", "gan"], "prior", "existing_npz"),
    ("evaluate-missing-keys-keeps-json", ["evaluate", "@missing_keys.npz", "--json", "@existing_json"], "missing key", "existing_json"),
    ("evaluate-nan-keeps-json", ["evaluate", "@nan.npz", "--json", "@existing_json"], "nan", "existing_json"),
    ("evaluate-bad-oracle-keeps-json", ["evaluate", "@good.npz", "--json", "@existing_json", "--data", "none", "--oracle", "@no_checkpoints"], "no saved checkpoint", "existing_json"),
]


@pytest.mark.parametrize("argv,keyword,kept", [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES])
def test_cli_failure_leaves_existing_output_intact(argv, keyword, kept, world, capsys):
    argv = [_resolve(a, world) for a in argv]
    before = _files_under(world["tmp"])
    run_cli(capsys, argv, keyword, watch=[world[kept]])
    assert _files_under(world["tmp"]) == before


def test_train_refuses_to_overwrite_a_model(world, capsys, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(FLOW, dst)
    snapshot = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    run_cli(capsys, ["train", "flow", "--out", dst, "--epochs", "1"], "--resume", watch=[])
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == snapshot


# --------------------------------------------------------------------------------------------
# Python API cases


@pytest.fixture(scope="module")
def explainer():
    import cfjax

    return cfjax.Explainer.pretrained("mnist5k")


def _imgs(n=2, shape=(28, 28, 1), value=0.5, dtype=np.float32):
    return np.full((n, *shape), value, dtype)


def _nan_images():
    x = _imgs()
    x[0, 3, 4, 0] = np.nan
    return x


EXPLAINER_CASES = [
    ("rgb", lambda: _imgs(shape=(28, 28, 3)), "next", "channel"),
    ("wrong-size", lambda: _imgs(shape=(32, 32, 1)), "next", "(28, 28, 1)"),
    ("no-batch-axis", lambda: _imgs(1)[0], "next", "shape"),
    ("flat", lambda: np.zeros((2, 784), np.float32), "next", "shape"),
    ("empty", lambda: _imgs(0), "next", "empty"),
    ("uint8", lambda: _imgs(value=128, dtype=np.uint8), "next", "integer dtype"),
    ("strings", lambda: np.array([["a"]]), "next", "numeric"),
    ("nan", _nan_images, "next", "NaN"),
    ("inf", lambda: _imgs(value=np.inf), "next", "infinite"),
    ("above-one", lambda: _imgs(value=255.0), "next", "[0, 1]"),
    ("negative", lambda: _imgs(value=-0.5), "next", "[0, 1]"),
    ("target-10", lambda: _imgs(), 10, "outside"),
    ("target-word", lambda: _imgs(), "previous", "target"),
    ("target-float", lambda: _imgs(), np.array([1.5, 2.0]), "integer"),
    ("targets-wrong-length", lambda: _imgs(), np.array([1, 2, 3]), "shape"),
]


@pytest.mark.parametrize("make_x,target,keyword", [c[1:] for c in EXPLAINER_CASES], ids=[c[0] for c in EXPLAINER_CASES])
def test_explainer_bad_input(explainer, make_x, target, keyword):
    with pytest.raises(CfjaxError, match=None) as e:
        explainer.explain(make_x(), target=target)
    assert isinstance(e.value, ValueError)
    assert keyword.lower() in str(e.value).lower(), str(e.value)


def test_explainer_bad_settings_and_models(tmp_path, world):
    import cfjax

    cases = [
        (lambda: cfjax.Explainer.pretrained("mnist5k", step="giant"), "step rule"),
        (lambda: cfjax.Explainer.pretrained("mnist5k", direction="sideways"), "direction"),
        (lambda: cfjax.Explainer.pretrained("imagenet"), "no shipped flow model"),
        (lambda: cfjax.Explainer.load(tmp_path / "nothing"), "does not exist"),
        (lambda: cfjax.Explainer.load(CLF), "'classifier' model"),
        (lambda: cfjax.Explainer.load(world["truncated"]), "corrupt"),
        (lambda: cfjax.Explainer.load(world["other_arch"]), "architecture"),
    ]
    for call, keyword in cases:
        with pytest.raises(CfjaxError) as e:
            call()
        assert keyword.lower() in str(e.value).lower(), (keyword, str(e.value))


def test_explainer_bad_batch_size_and_predict(explainer):
    with pytest.raises(CfjaxError, match="^batch_size must be a positive integer"):  # the argument, not a flag
        explainer.explain(_imgs(), batch_size=0)
    with pytest.raises(CfjaxError, match="channel"):
        explainer.predict(_imgs(shape=(28, 28, 3)))
    with pytest.raises(CfjaxError, match=r"\[0, 1\]"):
        explainer.explain_all_classes(_imgs(value=2.0))


def test_pure_ecinn_bad_step_and_direction(explainer):
    from cfjax.methods import ecinn

    x, t = _imgs(), np.array([1, 2], np.int32)
    with pytest.raises(CfjaxError, match="step rule"):
        ecinn.counterfactual(explainer.params, explainer.config, x, t, step="giant")
    with pytest.raises(CfjaxError, match="direction"):
        ecinn.counterfactual(explainer.params, explainer.config, x, t, direction="sideways")


def _metric_cases():
    from cfjax import metrics as M

    x = _imgs(3)
    y = np.array([0, 1, 2], np.int32)
    return [
        ("validity-shape", lambda: M.validity(np.zeros((3, 2), np.int32), y), "shape"),
        ("validity-float", lambda: M.validity(y, y.astype(np.float32)), "integer"),
        ("l1-mismatch", lambda: M.proximity_l1(x, x[:, :10]), "same shape"),
        ("l2-flat", lambda: M.proximity_l2(x.reshape(3, -1), x.reshape(3, -1)), "(B, H, W, C)"),
        ("sparsity-mismatch", lambda: M.sparsity(x, x[:2]), "same shape"),
        ("runtime-n-0", lambda: M.runtime_per_counterfactual(1.0, 0), "positive"),
        ("runtime-nan", lambda: M.runtime_per_counterfactual(float("nan"), 3), "finite"),
        ("nn-empty-ref", lambda: M.nearest_neighbour_distance(x, x[:0], y[:0], y), "empty"),
        ("nn-ref-shape", lambda: M.nearest_neighbour_distance(x, _imgs(3, (32, 32, 1)), y, y), "reference images"),
        ("pca-k-too-big", lambda: M.fit_pca(x, 10), "k=10"),
        ("pca-k-0", lambda: M.fit_pca(x, 0), "k=0"),
        ("pca-other-size", lambda: M.pca_reconstruction_error(_imgs(3, (14, 14, 1)), M.fit_pca(x, 2)), "fitted"),
        ("deletion-steps-0", lambda: M.deletion_curve(lambda z: np.ones((len(z), 10)) / 10, x, x[..., 0], y, steps=0), "steps"),
        ("ig-steps-0", lambda: M.integrated_gradients(lambda z: z.reshape(len(z), -1)[:, :10], x, y, steps=0), "steps"),
        ("heatmap-shape", lambda: M.deletion_curve(lambda z: np.ones((len(z), 10)) / 10, x, x[:, :5, :5, 0], y), "heatmap"),
        ("marker-float-classes", lambda: M.marker_mass(x, y.astype(np.float32)), "integer"),
        ("marker-column", lambda: M.marker_mass(x, y, column=40), "column"),
        ("marker-classes-shape", lambda: M.marker_mass(x, y[:2]), "shape"),
        ("oracle-bad-output", lambda: M.oracle_agreement(lambda z: np.zeros((len(z), 2, 2)), x, y), "oracle"),
        ("batched-empty", lambda: M.batched_apply(lambda z: z, x[:0]), "empty"),
    ]


@pytest.mark.parametrize("idx", range(len(_metric_cases())), ids=[c[0] for c in _metric_cases()])
def test_metrics_bad_input(idx):
    name, call, keyword = _metric_cases()[idx]
    with pytest.raises(CfjaxError) as e:
        call()
    assert keyword.lower() in str(e.value).lower(), (name, str(e.value))


DATA_CASES = [
    ("unknown-name", lambda d: d.load_dataset("nosuchdata_xyz", "train"), "nosuchdata_xyz"),
    ("empty-name", lambda d: d.load_dataset("", "train"), "non-empty"),
    ("not-a-string", lambda d: d.load_dataset(None, "train"), "name"),
    ("unknown-split", lambda d: d.load_dataset("mnist5k", "validation"), "split"),
    ("fake-unknown-split", lambda d: d.load_dataset("fakemnist5k", "dev"), "split"),
    ("take-0", lambda d: d.load_dataset("mnist5k", "test").take(0), "limit must be a positive integer"),
    ("tfds-unprepared", lambda d: d.load_dataset("cifar10", "test", "/nonexistent/tfds"), "cifar10"),
    ("validate-targets-range", lambda d: d.validate_targets(np.array([3, 11]), 10), "outside"),
    ("validate-targets-float", lambda d: d.validate_targets(np.array([1.5]), 10), "integer"),
    ("validate-images-bool", lambda d: d.validate_images(np.ones((1, 28, 28, 1), bool), (28, 28, 1)), "dtype"),
]


@pytest.mark.parametrize("call,keyword", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_bad_input(call, keyword):
    from cfjax import data

    with pytest.raises(CfjaxError) as e:
        call(data)
    assert keyword.lower() in str(e.value).lower(), str(e.value)


CHECKPOINT_CASES = [
    ("flow-missing", "flow", "@a_dir/none", "does not exist"),
    ("flow-not-model", "flow", "@not_a_model", "not a cfjax model"),
    ("flow-corrupt-json", "flow", "@corrupt_json", "corrupt"),
    ("flow-no-checkpoints", "flow", "@no_checkpoints", "no saved checkpoint"),
    ("flow-garbled", "flow", "@garbled", "corrupt"),
    ("flow-other-arch", "flow", "@other_arch", "architecture"),
    ("flow-unfinished", "flow", "@unfinished", "unfinished"),
    ("classifier-given-flow", "classifier", str(FLOW), "'flow' model"),
    ("duq-given-classifier", "duq", str(CLF), "'classifier' model"),
    ("evaluate-load-duq", "any", str(DUQ), "'duq' model"),
]


@pytest.mark.parametrize("loader,path,keyword", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_loading_bad_input(loader, path, keyword, world):
    from cfjax.checkpoint import CheckpointError

    path = _resolve(path, world)
    if loader == "flow":
        from cfjax.pipelines.train_flow import load_flow as load
    elif loader == "classifier":
        from cfjax.pipelines.train_classifier import load_classifier as load
    elif loader == "duq":
        from cfjax.pipelines.train_duq import load_duq as load
    else:
        from cfjax.pipelines.evaluate import load_model as load
    with pytest.raises(CfjaxError) as e:
        load(path)
    assert keyword.lower() in str(e.value).lower(), str(e.value)
    if loader != "any":
        assert isinstance(e.value, CheckpointError)


@pytest.mark.parametrize("loader,path,keyword", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_model_dirs_load_bad_input(loader, path, keyword, world):
    """The same cases through the one loader, cfjax.model_dirs.load: always a CheckpointError."""
    from cfjax import model_dirs
    from cfjax.checkpoint import CheckpointError

    if loader == "any":  # evaluate's own refusal of a DUQ model is its concern; the loader loads it
        assert model_dirs.load("any", _resolve(path, world)).kind == "duq"
        return
    with pytest.raises(CheckpointError) as e:
        model_dirs.load(loader, _resolve(path, world))
    assert keyword.lower() in str(e.value).lower(), str(e.value)


def test_damaged_copies_did_not_touch_the_shipped_models():
    # the corpus damages copies only: the shipped flow still loads
    from cfjax.pipelines.train_flow import load_flow

    params, config, info = load_flow(FLOW)
    assert info["status"] == "complete" and config.num_classes == 10
    assert os.path.isdir(FLOW / "checkpoints")
