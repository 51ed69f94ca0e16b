"""The file contract of `cfjax explain` (``--data Q.npz``, ``--model NAME``, ``--target T.npy``),
IDX folders as --data-dir, --extra-train, pixel-space judges, and the failure paths that must
give one line and exit 2 before any work."""

import gzip
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.cli import main
from cfjax.data import idx_files, load_dataset, load_npz_dataset, open_split
from cfjax.errors import CfjaxError
from cfjax.models import judges

GLOW = "mnist5k_glow"  # the small shipped Glow flow: cheap to compile in tests


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    test = load_dataset("mnist5k", "test").take(12)
    x8 = np.round(test.images * 255).astype(np.uint8)
    np.savez(d / "q.npz", x=x8, y=np.eye(10, dtype=np.float32)[test.labels])
    np.savez(d / "q_noy.npz", x=test.images)
    np.save(d / "t.npy", (test.labels + 3) % 10)
    np.save(d / "t_short.npy", np.zeros(11, np.int64))
    np.save(d / "t_range.npy", np.full(12, 10))
    return d, test


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_file_queries_named_model_and_target_file(queries, tmp_path, capsys):
    d, test = queries
    out = tmp_path / "cf.npz"
    rc, stdout, _ = _run(capsys, "explain", "ecinn", "--model", GLOW, "--data", str(d / "q.npz"), "--limit", "all",
                         "--target", str(d / "t.npy"), "--out", str(out), "--quiet")
    assert rc == 0, stdout
    with np.load(out) as f:
        np.testing.assert_array_equal(f["y_target"], (test.labels + 3) % 10)
        np.testing.assert_array_equal(f["y"], test.labels)  # one-hot y read as classes
        np.testing.assert_allclose(f["x"], np.round(test.images * 255) / 255, atol=1e-6)  # uint8 / 255
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())
    # without y the labels are -1
    rc, _, _ = _run(capsys, "explain", "ecinn", "--model", GLOW, "--data", str(d / "q_noy.npz"), "--limit", "5",
                    "--out", str(tmp_path / "cf2.npz"), "--quiet")
    assert rc == 0
    with np.load(tmp_path / "cf2.npz") as f:
        np.testing.assert_array_equal(f["y"], -np.ones(5))


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "{d}/q.npz"], "say which model"),
        (["--model", GLOW, "--data", "{d}/q.npz", "--split", "test"], "is one split"),
        (["--model", GLOW, "--data", "{d}/q.npz", "--limit", "all", "--target", "{d}/t_short.npy"], "holds 11 targets but there are 12"),
        (["--model", GLOW, "--data", "{d}/q.npz", "--limit", "all", "--target", "{d}/t_range.npy"], "outside the model's classes"),
        (["--model", GLOW, "--data", "{d}/q.npz", "--target", "{d}/missing.npy"], "does not exist"),
        (["--model", GLOW, "--data", "{d}/missing.npz"], "does not exist"),
        (["--model", GLOW, "--png", "{t}/grid.gif"], "unsupported picture type"),
        (["--model", GLOW, "--png", "{t}/cf.npz"], "unsupported picture type"),
        (["--model", GLOW, "--png", "{t}/cf.png", "--out", "{t}/cf.png"], "same file as --out"),
        (["--model", GLOW, "--step", "nan"], "finite"),
        (["--model", GLOW, "--out", "{t}/missing/cf.npz"], "does not exist"),
    ],
)
def test_bad_explain_input_is_one_line_exit_2(queries, tmp_path, capsys, extra, message):
    d, _ = queries
    argv = ["explain", "ecinn", "--out", str(tmp_path / "cf.npz")] + [a.format(d=d, t=tmp_path) for a in extra]
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "cf.npz").exists() or "--out" in extra  # nothing written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "flow", "--out", "{t}/no/such/dir", "--epochs", "1"], "does not exist"),
        (["train", "flow", "--out", "{t}/run", "--checkpoint-every", "0"], "--checkpoint-every must be a positive integer"),
        (["train", "flow", "--out", "{t}/run", "--lr", "nan"], "--lr must be a positive finite number"),
        (["train", "flow", "--out", "{t}/run", "--beta", "inf"], "--beta must be a positive finite number"),
        (["train", "flow", "--out", "{t}/run", "--extra-train", "{t}/none.npz"], "does not exist"),
    ],
)
def test_bad_train_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    rc, _, err = _run(capsys, *[a.format(t=tmp_path) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_unwritable_location_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError from deep inside a command (here: a full disk at save time) is one line."""
    import cfjax.pipelines.explain_common as ec

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "cf.npz"))

    monkeypatch.setattr(ec.np, "savez_compressed", full)
    rc, _, err = _run(capsys, "explain", "ecinn", "--model", GLOW, "--limit", "2", "--out", str(tmp_path / "cf.npz"), "--quiet")
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_evaluate_refuses_images_outside_unit_interval(tmp_path, capsys):
    n = 3
    np.savez(tmp_path / "cf.npz", x=np.full((n, 28, 28, 1), 0.5, np.float32), x_cf=np.full((n, 28, 28, 1), 7.0, np.float32),
             y=np.zeros(n, np.int32), y_pred=np.zeros(n, np.int32), y_target=np.ones(n, np.int32), y_cf_pred=np.ones(n, np.int32))
    rc, _, err = _run(capsys, "evaluate", str(tmp_path / "cf.npz"))
    assert rc == 2 and "must lie in [0, 1]" in err


def test_ecinn_out_of_range_class_gives_nan():
    from cfjax.methods import ecinn

    lat = {"mu": jnp.eye(3, 4) * 5, "logit_prior": jnp.zeros(3)}
    z = jnp.ones((3, 4))
    z_cf, a0, a = ecinn.latent_step(lat, lat["mu"], z, jnp.array([0, 0, 0]), jnp.array([1, 3, -1]))
    assert np.all(np.isfinite(np.asarray(z_cf[0]))) and np.all(np.isnan(np.asarray(z_cf[1:])))


def _write_idx(path, arr, gz):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_reads_like_the_arrays(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 7), ("t10k", 5))}
    labs = {s: rng.integers(0, 10, len(v)) for s, v in imgs.items()}
    sfx = ".gz" if gz else ""
    for s in imgs:
        _write_idx(tmp_path / f"{s}-images-idx3-ubyte{sfx}", imgs[s], gz)
        _write_idx(tmp_path / f"{s}-labels-idx1-ubyte{sfx}", labs[s], gz)
    assert idx_files(tmp_path, "test") is not None
    ds = load_dataset("fashion_mnist", "test", tmp_path)
    np.testing.assert_allclose(ds.images[..., 0], imgs["t10k"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.labels, labs["t10k"])
    x, y = open_split("fashion_mnist", "train", tmp_path).read(2, 6)
    np.testing.assert_allclose(x[..., 0], imgs["train"][2:6] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, labs["train"][2:6])
    # a truncated file is named
    raw = open(tmp_path / f"t10k-images-idx3-ubyte{sfx}", "rb").read()
    if not gz:
        open(tmp_path / "t10k-images-idx3-ubyte", "wb").write(raw[:-10])
        with pytest.raises(CfjaxError, match="truncated"):
            load_dataset("fashion_mnist", "test", tmp_path)


def test_npz_dataset_checks(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(CfjaxError, match="no array 'x'"):
        load_npz_dataset(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.full((2, 28, 28), 3.0))
    with pytest.raises(CfjaxError, match=r"\[0, 1\]"):
        load_npz_dataset(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(CfjaxError, match="not a readable"):
        load_npz_dataset(tmp_path / "c.npz")


def test_judges_learn_and_read_pixels():
    """Both judges classify held-out digits far above chance, and a judge's view does not move
    under a tiny perturbation that a gradient step against a CNN might make."""
    tr = load_dataset("mnist5k", "train")
    te = load_dataset("mnist5k", "test").take(300)
    for kind in judges.KINDS:
        j = judges.fit(kind, tr.images, tr.labels, 10)
        acc = float(np.mean(judges.predict(j, te.images) == te.labels))
        assert acc > 0.9, (kind, acc)
        noisy = np.clip(te.images + 0.02 * np.random.default_rng(0).standard_normal(te.images.shape), 0, 1)
        assert np.mean(judges.predict(j, noisy) == judges.predict(j, te.images)) > 0.95
    with pytest.raises(CfjaxError, match="unknown judge"):
        judges.fit("svm", tr.images, tr.labels, 10)


def test_resume_with_another_length_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "flow", "--out", str(out), "--levels", "1", "--steps-per-level", "1", "--hidden", "4",
            "--batch-size", "500", "--quiet", "--checkpoint-every", "2"]
    assert _run(capsys, *base, "--steps", "4")[0] == 0
    rc, _, err = _run(capsys, *base, "--steps", "6", "--resume")
    assert rc == 2 and "resume with the same --epochs/--steps" in err, err
    assert stat.S_ISDIR(os.stat(out).st_mode)


def test_readme_python_snippet_runs():
    """The README's Python example runs as written (on the shipped default model)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("## Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["out"]["x_cf"].shape == (8, 28, 28, 1)
    assert np.asarray(scope["cf"]["x_cf"]).shape == (8, 28, 28, 1)
