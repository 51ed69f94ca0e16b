"""The judge panel of the DISC realism work: a CNN oracle and two pixel-space judges of other
model families, calibrated on the ECINN authors' reference files, then applied to CF.npz files.

    python examples/judge_panel.py [CF.npz ...] [--reference ../shared/data/ecinn_reference]
        [--oracle cfjax/pretrained/mnist5k_oracle] [--json out.json]

The panel: the shipped ResNet oracle (``mnist5k_oracle``, a CNN trained on mnist5k's 4,000
training digits) and the RBF random-feature and PCA k-NN judges of :mod:`cfjax.models.judges`,
fit on the data policy's 9,000 digits (mnist5k train + MNIST test images 0-4999, the same judges
and cache as examples/ecinn_reference.py). No judge was shaped by an explained model.

Calibration rows (MNIST test images 5000-9999, never trained on): each judge's accuracy on the
real digits, and its target agreement on the authors' GEN (ECINN), GB (gradient baseline,
adversarial-like) and GL (prototype baseline) counterfactuals with the authors' targets. A
judge is believed when it reads >= 90% of the real digits correctly, >= 85% of GEN as the
target and, for the non-CNN judges, <= 30% of GB. Each CF.npz given on the command line then
gets one row: every judge's target agreement on ``x_cf`` against ``y_target`` and "all agree",
with 95% Wilson intervals; queries whose target equals the prediction are left out.

Blank images: every judge of this panel (and the explained CNN) reads an empty image as a 1, so a
counterfactual that erases the query would pass for one. An image with less ink (mean pixel
value) than every one of the 9,000 training digits is therefore not a digit: it counts as a miss
for every judge, and the "blank" column counts such images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cfjax import model_dirs
from cfjax.pipelines.explain_disc import predict_proba_batched

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ecinn_reference as er  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
ORACLE = HERE / "cfjax/pretrained/mnist5k_oracle"


def panel(reference: Path, cache: Path | None, oracle_dir: Path) -> dict:
    """name -> predict(images (N, 28, 28, 1) float in [0, 1]) -> classes (N,)."""
    from cfjax.models import judges

    oracle = model_dirs.load("classifier", oracle_dir)
    out = {"oracle": lambda x: np.argmax(predict_proba_batched(oracle.apply, oracle.params, x), -1)}
    for kind, j in er.fit_judges(reference, cache).items():
        out[kind] = lambda x, j=j: judges.predict(j, x)
    return out


def ink(x: np.ndarray) -> np.ndarray:
    """Mean pixel value per image, (N, ...) in [0, 1] -> (N,)."""
    return np.asarray(x, np.float64).reshape(len(x), -1).mean(1)


def ink_floor(reference: Path) -> float:
    """The least ink of any of the judges' 9,000 training digits: below it, an image is blank."""
    x, _ = er.training_images(reference)
    return float(ink(x).min())


def agreement(preds: dict, x: np.ndarray, target: np.ndarray, floor: float) -> dict:
    """Each judge's target agreement on x (a blank image is a miss for all), "all agree", and
    the blank rate."""
    blank = ink(x) < floor
    hits = {name: (predict(x) == target) & ~blank for name, predict in preds.items()}
    row = {name: er.rate(h) for name, h in hits.items()}
    row["blank"] = er.rate(blank)
    row["all_agree"] = er.rate(np.all(list(hits.values()), axis=0))
    row["pixel_judges_agree"] = er.rate(np.all([h for n, h in hits.items() if n != "oracle"], axis=0))
    return row


def calibration(preds: dict, reference: Path, floor: float) -> dict:
    real = np.load(reference / "mnist_test_real.npz")
    x = real["x"][er.HELD_OUT].astype(np.float32).reshape(-1, 28, 28, 1) / 255.0
    y = real["y"][er.HELD_OUT].argmax(1)
    rows = {"real test digits (accuracy)": agreement(preds, x, y, floor)}
    for name in ("GEN", "GB", "GL"):
        f = np.load(reference / f"mnist_cf_{name}.npz")
        q = f["q"][er.HELD_OUT].astype(np.int64)
        ok = q >= 0
        cfs = f["cfs"][er.HELD_OUT][ok].astype(np.float32).reshape(-1, 28, 28, 1) / 255.0
        rows[f"authors' {name}"] = agreement(preds, cfs, q[ok], floor)
    return rows


def calibrated(rows: dict) -> dict:
    """Which judges pass the calibration rule (see the module docstring)."""
    out = {}
    for name in ("oracle", "rbf", "knn"):
        ok = rows["real test digits (accuracy)"][name]["rate"] >= 0.90 and rows["authors' GEN"][name]["rate"] >= 0.85
        if name != "oracle":
            ok = ok and rows["authors' GB"][name]["rate"] <= 0.30
        out[name] = bool(ok)
    return out


def cf_row(preds: dict, path: Path, floor: float) -> dict:
    with np.load(path) as f:
        d = {k: f[k] for k in ("x", "x_cf", "y_target", "y_pred", "y_cf_pred")}
    asked = d["y_target"] != d["y_pred"]
    target = d["y_target"][asked]
    row = agreement(preds, d["x_cf"][asked], target, floor)
    row["flip_rate"] = er.rate(d["y_cf_pred"][asked] == target)
    row["l1_per_pixel"] = round(float(np.mean(np.abs(d["x_cf"][asked] - d["x"][asked]))), 4)
    return row


def fmt(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% ({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f})"


def table(rows: dict) -> str:
    cols = ("oracle", "rbf", "knn", "pixel_judges_agree", "all_agree", "blank")
    lines = ["| images | n | ResNet oracle | RBF judge | k-NN judge | both pixel judges | all three | blank |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['oracle']['n']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cf", nargs="*", help="CF.npz files to judge (28x28 MNIST counterfactuals)")
    p.add_argument("--reference", default=str(HERE.parent / "shared/data/ecinn_reference"))
    p.add_argument("--oracle", default=str(ORACLE))
    p.add_argument("--judge-cache", default=str(Path.home() / ".cache/cfjax/judges_mnist9k.npz"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    reference = Path(args.reference)
    if not (reference / "mnist_test_real.npz").exists():
        p.error(f"--reference {reference}: no mnist_test_real.npz there (the ECINN authors' reference files)")
    missing = [c for c in args.cf if not Path(c).is_file()]
    if missing:
        p.error(f"no such CF.npz: {missing[0]}")
    preds = panel(reference, Path(args.judge_cache) if args.judge_cache else None, Path(args.oracle))
    floor = ink_floor(reference)
    cal = calibration(preds, reference, floor)
    rows = {Path(c).name: cf_row(preds, Path(c), floor) for c in args.cf}
    result = {"ink_floor": floor, "calibration": cal, "calibrated": calibrated(cal), "counterfactuals": rows}
    print("calibration (MNIST test images 5000-9999):\n" + table(cal))
    print("calibrated:", result["calibrated"])
    if rows:
        print("\n" + table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
