"""examples/judge_panel.py on a reference folder made here: the calibration rule, the rows and the
end-to-end run (the ECINN authors' files are not part of the project, so a stand-in is built
from mnist5k: real digits as "real", the digits themselves as a perfect "GEN", the digits with
a wrong target as "GB")."""


import numpy as np
import pytest

from cfjax.data import load_dataset



@pytest.fixture(scope="module")
def panel_mod(load_example):
    return load_example("judge_panel")


def _rate(r):
    return {"rate": r, "ci95": [r, r], "n": 10}


def test_calibration_rule(panel_mod):
    good = {"oracle": _rate(0.99), "rbf": _rate(0.95), "knn": _rate(0.95)}
    rows = {"real test digits (accuracy)": good, "authors' GEN": good,
            "authors' GB": {"oracle": _rate(0.9), "rbf": _rate(0.1), "knn": _rate(0.31)}}
    # a CNN oracle may believe GB; a pixel judge that does is not calibrated
    assert panel_mod.calibrated(rows) == {"oracle": True, "rbf": True, "knn": False}
    rows["authors' GEN"] = dict(good, rbf=_rate(0.84))
    assert panel_mod.calibrated(rows)["rbf"] is False


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_end_to_end_on_a_stand_in_reference(panel_mod, tmp_path):
    te = load_dataset("mnist5k", "test")
    tr = load_dataset("mnist5k", "train")
    # 10,000 "test" digits: indices 0-4999 join the judges' training set, 5000-9999 are held out
    x = np.concatenate([tr.images[:4000], tr.images[:1000]] + [te.images] * 5)
    y = np.concatenate([tr.labels[:4000], tr.labels[:1000]] + [te.labels] * 5)
    assert len(x) == 10000
    x8 = np.round(x * 255).astype(np.uint8)
    ref = tmp_path / "ref"
    ref.mkdir()
    np.savez(ref / "mnist_test_real.npz", x=x8, y=np.eye(10, dtype=np.float32)[y])
    np.savez(ref / "mnist_cf_GEN.npz", cfs=x8[..., 0], q=y, orig_pred=y, cf_pred=y)
    wrong = (y + 1) % 10
    np.savez(ref / "mnist_cf_GB.npz", cfs=x8[..., 0], q=wrong, orig_pred=y, cf_pred=wrong)
    np.savez(ref / "mnist_cf_GL.npz", cfs=x8[..., 0], q=np.where(np.arange(len(y)) % 2 == 0, y, -1), orig_pred=y, cf_pred=y)
    # a CF.npz whose "counterfactuals" are real digits of their target class, one query not asked
    q = te.images[:40]
    t = te.labels[40:80].copy()
    pred = t.copy()
    pred[:20] = (t[:20] + 3) % 10
    cf = tmp_path / "cf.npz"
    src = te.images[40:80]
    np.savez(cf, x=q, x_cf=src, y_target=t, y_pred=pred, y_cf_pred=t)
    # erased queries: every judge reads an empty image as a 1, the panel counts it as a miss
    blank = tmp_path / "blank.npz"
    tb = np.ones(10, np.int64)
    np.savez(blank, x=te.images[:10], x_cf=np.zeros_like(te.images[:10]), y_target=tb, y_pred=tb * 0, y_cf_pred=tb)
    out = panel_mod.main([str(cf), str(blank), "--reference", str(ref), "--judge-cache", str(tmp_path / "judges.npz"),
                          "--json", str(tmp_path / "panel.json")])
    cal = out["calibration"]
    assert cal["authors' GB"]["rbf"]["rate"] < 0.05 and cal["authors' GB"]["knn"]["rate"] < 0.05
    assert cal["real test digits (accuracy)"]["oracle"]["rate"] > 0.95
    assert cal["authors' GL"]["oracle"]["n"] == 2500  # skipped queries (q = -1) left out
    assert out["calibrated"] == {"oracle": True, "rbf": True, "knn": True}
    row = out["counterfactuals"]["cf.npz"]
    assert row["oracle"]["n"] == 20  # the 20 queries whose target equals the prediction are left out
    assert row["oracle"]["rate"] >= 0.9 and row["rbf"]["rate"] >= 0.9 and row["knn"]["rate"] >= 0.9
    assert (tmp_path / "panel.json").exists() and (tmp_path / "judges.npz").exists()
    assert row["blank"]["rate"] == 0.0
    erased = out["counterfactuals"]["blank.npz"]
    assert erased["blank"]["rate"] == 1.0 and erased["flip_rate"]["rate"] == 1.0
    assert erased["oracle"]["rate"] == erased["rbf"]["rate"] == erased["knn"]["rate"] == 0.0
    assert 0 < out["ink_floor"] < 0.05
