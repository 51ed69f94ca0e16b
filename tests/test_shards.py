"""Dataset-scale runs: shards + manifest, kill/resume to identical arrays, refusals, evaluate on shards."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cfjax.cli import main
from cfjax.data import load_dataset, open_split, reader_from_source
from cfjax.errors import CfjaxError
from cfjax.pipelines import shards as sh

# One compiled ECINN shape for every test here (batch 8, no refinement): the jit cache is shared.
ECINN = ["explain", "ecinn", "--limit", "36", "--shards", "--shard-size", "8", "--batch-size", "8", "--refine", "0", "--quiet"]
# The cheapest DISC: pixels prior, no manifold model, one stage, 3 steps.
DISC = ["explain", "disc", "--limit", "10", "--batch-size", "4", "--steps", "3", "--prior", "pixels", "--manifold", "none",
        "--no-progressive", "--quiet"]


class Crash(Exception):
    pass


def crash_after(monkeypatch, k: int, when: str):
    """Stop the run like a kill would, right after the k-th shard is written/recorded."""

    def hook(k_done, w):
        if k_done == k and w == when:
            raise Crash(f"{k}:{when}")

    monkeypatch.setattr(sh, "_kill_hook", hook)


def shard_arrays(d):
    """{shard file: {key: bytes}} of a directory, without the wall-time field."""
    out = {}
    for e in sh.open_shards(d).entries:
        with np.load(d / e["file"]) as f:
            out[e["file"]] = {k: f[k].tobytes() for k in f.files if k != "seconds"}
    return out


@pytest.fixture(scope="module")
def ecinn_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "ref"
    assert main([*ECINN, "--out", str(d)]) == 0
    return d


def test_uninterrupted_run_writes_shards_and_manifest(ecinn_reference):
    d = ecinn_reference
    m = json.loads((d / "manifest.json").read_text())
    assert m["completed"] and m["num_queries"] == 36 and m["num_shards"] == 5 and m["method"] == "ecinn"
    assert [(e["start"], e["stop"]) for e in m["shards"]] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 36)]
    assert m["settings"]["batch_size"] == 8 and m["settings"]["refine"] == 0
    ref = load_dataset("mnist5k", "test")
    full = sh.load_shards(d)
    np.testing.assert_array_equal(full["x"], ref.images[:36])
    np.testing.assert_array_equal(full["y"], ref.labels[:36])
    np.testing.assert_array_equal(full["query_index"], np.arange(36))
    assert full["x_cf"].shape == (36, 28, 28, 1) and full["heatmap"].shape == (36, 28, 28)
    np.testing.assert_array_equal(full["y_target"], (full["y_pred"] + 1) % 10)
    assert np.mean(full["y_cf_pred"] == full["y_target"]) > 0.7
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json"] + [sh.shard_name(k) for k in range(5)]


@pytest.mark.parametrize("when", ["written", "recorded"])
def test_crash_then_resume_gives_identical_arrays(tmp_path, monkeypatch, ecinn_reference, when):
    d = tmp_path / "run"
    crash_after(monkeypatch, 2, when)
    with pytest.raises(Crash):
        main([*ECINN, "--out", str(d)])
    m = json.loads((d / "manifest.json").read_text())
    assert not m["completed"] and len(m["shards"]) == (1 if when == "written" else 2)
    monkeypatch.undo()
    assert main([*ECINN, "--out", str(d), "--resume"]) == 0
    assert shard_arrays(d) == shard_arrays(ecinn_reference)
    assert json.loads((d / "manifest.json").read_text())["completed"]


def test_refusals_one_line_errors(tmp_path, ecinn_reference, capsys):
    d = ecinn_reference
    before = shard_arrays(d)
    # an existing non-empty directory is never overwritten
    assert main([*ECINN, "--out", str(d)]) == 2
    assert "not empty" in capsys.readouterr().err
    # --resume with other settings names the setting
    assert main([*ECINN, "--out", str(d), "--resume", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "settings.batch_size" in err and "directory has 8" in err and err.count("\n") == 1
    # a directory made with the paper's move is not resumed with another --residual
    assert main([*ECINN, "--out", str(d), "--resume", "--residual", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "residual" in err and err.count("\n") == 1
    assert main([*ECINN, "--out", str(d), "--resume", "--limit", "30"]) == 2
    assert "num_queries" in capsys.readouterr().err
    # --resume needs a shard directory; --png needs one CF.npz
    assert main(["explain", "ecinn", "--out", str(tmp_path / "x.npz"), "--resume"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert main([*ECINN, "--out", str(tmp_path / "new"), "--png", str(tmp_path / "g.png")]) == 2
    assert "--png" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assert main([*ECINN, "--out", str(tmp_path / "junk"), "--resume"]) == 2
    assert "not a cfjax shard directory" in capsys.readouterr().err
    assert main([*ECINN, "--out", str(tmp_path / "s"), "--shard-size", "0"]) == 2
    assert shard_arrays(d) == before


def test_corrupt_shard_is_recomputed_on_resume_and_refused_by_evaluate(tmp_path, ecinn_reference, capsys):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(ecinn_reference, d)
    victim = d / sh.shard_name(1)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    (d / "shard-00003.npz.abc.tmp.npz").write_bytes(b"partial")  # a write cut off by a kill
    assert main(["evaluate", str(d), "--data", "none", "--oracle", "none", "--flow", "none", "--model", "none"]) == 2
    err = capsys.readouterr().err
    assert "shard-00001.npz" in err and "--resume" in err
    assert main([*ECINN, "--out", str(d), "--resume"]) == 0
    assert "shard-00001.npz: size" in capsys.readouterr().out
    assert shard_arrays(d) == shard_arrays(ecinn_reference)
    assert not list(d.glob("*.tmp*"))


def test_two_processes_share_a_directory(tmp_path, ecinn_reference):
    d = tmp_path / "pod"
    assert main([*ECINN, "--out", str(d), "--process-index", "1", "--process-count", "2"]) == 0
    part = sh.open_shards(d)
    assert [e["index"] for e in part.entries] == [1, 3] and not part.complete
    with pytest.raises(CfjaxError, match="incomplete"):
        sh.load_shards(d)
    assert main([*ECINN, "--out", str(d), "--process-index", "0", "--process-count", "2", "--resume"]) == 0
    assert sorted(p.name for p in d.glob("manifest*")) == ["manifest-p00000-of-00002.json", "manifest-p00001-of-00002.json"]
    assert shard_arrays(d) == shard_arrays(ecinn_reference)


def _evaluate_both(tmp_path, shard_dir, common):
    from cfjax.pipelines.explain_common import save_npz_atomic

    full = sh.load_shards(shard_dir)
    save_npz_atomic(tmp_path / "all.npz", **full)
    assert main(["evaluate", str(tmp_path / "all.npz"), "--json", str(tmp_path / "a.json"), *common]) == 0
    assert main(["evaluate", str(shard_dir / "manifest.json"), "--json", str(tmp_path / "b.json"), *common]) == 0
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["n"] == b["n"] == 36
    for k, v in a.items():
        if isinstance(v, float):
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k  # float32 metrics in other batch shapes
    return a, b


def test_evaluate_shard_dir_matches_the_concatenated_file(tmp_path, ecinn_reference):
    a, b = _evaluate_both(tmp_path, ecinn_reference, ["--data", "none", "--oracle", "none", "--heatmap-limit", "0"])
    assert {"validity", "l1", "l2_per_pixel", "sparsity", "seconds_per_cf"} <= set(b)
    # seconds_per_cf: the manifest's recorded generation time over all shards
    m = json.loads((ecinn_reference / "manifest.json").read_text())
    assert b["seconds_per_cf"] == pytest.approx(m["seconds"] / 36, rel=1e-6)


@pytest.mark.slow
def test_evaluate_shard_dir_all_metric_groups(tmp_path, ecinn_reference):
    a, b = _evaluate_both(tmp_path, ecinn_reference, ["--data", "mnist5k", "--heatmap-limit", "12", "--ig-steps", "4", "--steps", "5"])
    assert {"nn_distance", "pca_error", "bits_per_dim", "oracle_agreement", "deletion_auc"} <= set(b) and b["heatmap_n"] == 12


def test_disc_shards_equal_one_file_and_resume(tmp_path, monkeypatch):
    one = tmp_path / "one.npz"
    assert main([*DISC, "--out", str(one)]) == 0
    d = tmp_path / "disc"
    crash_after(monkeypatch, 1, "recorded")
    with pytest.raises(Crash):
        main([*DISC, "--out", str(d), "--shards", "--shard-size", "4"])
    monkeypatch.undo()
    # A directory written before the first-BN weight had its current name still resumes.
    mp = d / "manifest.json"
    m = json.loads(mp.read_text())
    m["settings"]["disc"]["bn_first_layer_weight"] = m["settings"]["disc"].pop("first_bn_weight")
    mp.write_text(json.dumps(m))
    assert main([*DISC, "--out", str(d), "--shards", "--shard-size", "4", "--resume"]) == 0
    got = sh.load_shards(d)
    with np.load(one) as f:
        for k in f.files:
            if k != "seconds":
                assert got[k].tobytes() == f[k].tobytes(), k  # per-query keys: same as one file, bit for bit
    m = json.loads((d / "manifest.json").read_text())
    assert m["settings"]["disc"]["prior"] == "pixels" and [e["n"] for e in m["shards"]] == [4, 4, 2]


def test_split_reader_matches_load_dataset():
    ref = load_dataset("mnist5k", "test")
    r = open_split("mnist5k", "test")
    assert len(r) == len(ref) and r.image_shape == (28, 28, 1)
    x, y = r.read(990, 1005)  # clipped at the end
    np.testing.assert_array_equal(x, ref.images[990:])
    np.testing.assert_array_equal(y, ref.labels[990:])
    # the tfds path: any random-access sequence of {"image", "label"} dicts (uint8 pixels)
    rng = np.random.default_rng(0)
    items = [{"image": rng.integers(0, 256, (5, 4), np.uint8), "label": i % 3} for i in range(7)]
    t = reader_from_source("toy", "train", items, 3)
    xi, yi = t.read(2, 6)
    assert xi.shape == (4, 5, 4, 1) and xi.dtype == np.float32
    np.testing.assert_array_equal(xi[..., 0], np.stack([it["image"] for it in items[2:6]]) / np.float32(255))
    np.testing.assert_array_equal(yi, [2, 0, 1, 2])
    with pytest.raises(CfjaxError, match="empty"):
        reader_from_source("toy", "train", [])


@pytest.mark.slow
def test_sigkill_then_resume_in_subprocesses(tmp_path, ecinn_reference):
    """A real SIGKILL (no cleanup runs) between writing shard 3 and recording it."""
    d = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{sh.KILL_HOOK: "3:written"})
    p = subprocess.run([sys.executable, "-m", "cfjax.cli", *ECINN, "--out", str(d)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (d / sh.shard_name(2)).exists() and len(json.loads((d / "manifest.json").read_text())["shards"]) == 2
    env.pop(sh.KILL_HOOK)
    p = subprocess.run([sys.executable, "-m", "cfjax.cli", *ECINN, "--out", str(d), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 shard(s) verified, 3 to compute" in p.stdout
    assert shard_arrays(d) == shard_arrays(ecinn_reference)
