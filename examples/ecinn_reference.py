"""cfjax's ECINN side by side with the ECINN authors' own counterfactuals, judged by pixel-space
judges of other model families (cfjax.models.judges) that no explained model shaped.

    python examples/ecinn_reference.py --model DIR [--reference ../shared/data/ecinn_reference]
        [--step adaptive --refine 2 --direction predicted_means] [--json out.json] [--png pairs.png]

Data policy (the reference README's held-out rule): the judges train on mnist5k's train split plus
MNIST test images 0-4999, the same 9,000 images as the shipped flow; every number below is on MNIST
test images 5000-9999, with the authors' targets ``q`` of their GEN file. The reference data is
read from the folder given, never copied into the project.

Rows: real test digits (judge accuracy), the authors' GEN (ECINN), GB and GL counterfactuals, and
cfjax's ECINN on the same queries and targets; columns: validity under the producing model (for
the authors' files their recorded ``cf_pred``), each judge's target agreement and "all agree",
with Wilson 95% intervals, and the study's own columns (ElasticNet, IM1, IM2, Frechet distance;
cfjax.pipelines.study, autoencoders fit on the same 9,000 digits and cached beside the judges).
Also: mnist5k test, 300 queries, ``--target next``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from cfjax import metrics as M
from cfjax.data import load_dataset
from cfjax.explainer import Explainer
from cfjax.models import judges
from cfjax.pipelines import study
from cfjax.pipelines.explain_ecinn import DEFAULT_STEP

HELD_OUT = slice(5000, 10000)


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return [float("nan"), float("nan")]
    z, p = 1.96, k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(c - h, 4), round(c + h, 4)]


def rate(hits: np.ndarray) -> dict:
    k, n = int(np.sum(hits)), int(np.size(hits))
    return {"rate": round(k / max(n, 1), 4), "ci95": wilson(k, n), "n": n}


def training_images(reference: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 9,000 digits of the data policy: mnist5k train + MNIST test images 0-4999."""
    tr = load_dataset("mnist5k", "train")
    real = np.load(reference / "mnist_test_real.npz")
    x = np.concatenate([tr.images, real["x"][:5000].astype(np.float32) / 255.0])
    y = np.concatenate([tr.labels, real["y"][:5000].argmax(1)])
    return x, y


def fit_judges(reference: Path, cache: Path | None) -> dict:
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            out = {}
            for kind in judges.KINDS:
                out[kind] = {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(kind + "/")}
            return out
    x, y = training_images(reference)
    out = {kind: judges.fit(kind, x, y, 10) for kind in judges.KINDS}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **{f"{kind}/{k}": v for kind, j in out.items() for k, v in j.items()})
    return out


def judge_row(js: dict, images: np.ndarray, target: np.ndarray, valid: np.ndarray | None) -> dict:
    row = {}
    if valid is not None:
        row["validity"] = rate(valid)
    agree = []
    for kind, j in js.items():
        hit = judges.predict(j, images) == target
        row[f"judge_{kind}"] = rate(hit)
        agree.append(hit)
    both = np.all(agree, axis=0)
    row["judges_all_agree"] = rate(both)
    # per target class: where a flow fails shows up here first (a class whose decodes turn to grids)
    lone = np.asarray(M.isolated_ink(images, reduce=False))
    row["by_target"] = {int(t): {"n": int(np.sum(target == t)), "judges_all_agree": round(float(np.mean(both[target == t])), 4),
                                 "isolated_ink": round(float(np.mean(lone[target == t])), 3)}
                        for t in np.unique(target)}
    # stroke texture (cfjax.metrics): real digits ~0.36 grey share, ~1.4 Laplacian energy, ~0.07 lone pixels
    row["texture"] = {name: round(float(v), 4) for name, v in M.stroke_texture(images).items()}
    return row


def marker_switched(x_cf: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """FakeMNIST's ground truth: the target's marker pixel (row = class, column 0) on, the
    query's off (threshold 0.5). x_cf (N, 28, 28[, 1]) in [0, 1]."""
    col = x_cf.reshape(len(x_cf), 28, 28)[:, :, 0]
    idx = np.arange(len(x_cf))
    return (col[idx, target] > 0.5) & (col[idx, source] < 0.5)


def fakemnist_rows(ref: Path, args) -> dict:
    real = np.load(ref / "fakemnist_test_real.npz")
    x = real["x"].astype(np.float32) / 255.0
    gen = np.load(ref / "fakemnist_cf_GEN.npz")
    q = gen["q"].astype(np.int32)
    ok = q >= 0
    label = real["y"].argmax(1)
    rows = {"authors GEN": {"marker_switched": rate(marker_switched(gen["cfs"][ok] / 255.0, gen["orig_pred"][ok], q[ok])),
                            "mean_abs_change": round(float(np.mean(np.abs(gen["cfs"][ok][..., None] / 255.0 - x[ok]))), 4)}}
    ex = Explainer.load(args.fakemnist_model, step=args.step, refine=args.refine, direction=args.direction)
    out = ex.explain(x[ok], target=q[ok])
    x_cf = np.round(np.clip(out["x_cf"], 0, 1) * 255) / 255
    rows["cfjax ECINN"] = {"marker_switched": rate(marker_switched(x_cf, out["y_pred"], q[ok])),
                           "validity": rate((ex.predict(x_cf) == q[ok]) & (out["y_pred"] != q[ok])),
                           "model_accuracy": round(float(np.mean(out["y_pred"] == label[ok])), 4),
                           "mean_abs_change": round(float(np.mean(np.abs(x_cf - x[ok]))), 4)}
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="cfjax flow model directory")
    p.add_argument("--reference", default=str(Path(__file__).resolve().parents[2] / "shared/data/ecinn_reference"))
    p.add_argument("--step", default=DEFAULT_STEP, help=f"step rule (default {DEFAULT_STEP}, the CLI default)")
    p.add_argument("--refine", type=int, default=2, help="refinement rounds (default 2, the CLI default)")
    p.add_argument("--direction", default="predicted_means")
    p.add_argument("--judge-cache", default=str(Path.home() / ".cache/cfjax/judges_mnist9k.npz"))
    p.add_argument("--fakemnist-model", default=None, help="a flow cfjax trained on fakemnist5k: adds the marker test on the authors' FakeMNIST test images")
    p.add_argument("--residual", type=float, default=1.0, help="share of the query's offset from its class mean kept (default 1, the paper)")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None, help="picture: query | authors' GEN | cfjax, 20 held-out queries")
    p.add_argument("--png-by-target", default=None,
                   help="picture: for each target class (rows) its first 6 held-out queries, each as query | authors' GEN | cfjax")
    args = p.parse_args(argv)
    ref = Path(args.reference)
    t0 = time.perf_counter()
    js = fit_judges(ref, Path(args.judge_cache) if args.judge_cache else None)
    real = np.load(ref / "mnist_test_real.npz")
    xq = real["x"][HELD_OUT].astype(np.float32) / 255.0
    yq = real["y"][HELD_OUT].argmax(1)
    gen = np.load(ref / "mnist_cf_GEN.npz")
    q = gen["q"][HELD_OUT].astype(np.int32)
    aes = study.cached_autoencoders(*training_images(ref), 10, "mnist9k")
    rows = {"real test digits (label)": judge_row(js, xq, yq, None)}
    for m in ("GEN", "GB", "GL"):
        d = np.load(ref / f"mnist_cf_{m}.npz")
        qm = d["q"][HELD_OUT]
        ok = qm >= 0
        cfs = d["cfs"][HELD_OUT][ok].astype(np.float32)[..., None] / 255.0
        rows[f"authors {m}"] = judge_row(js, cfs, qm[ok], d["cf_pred"][HELD_OUT][ok] == qm[ok])
        rows[f"authors {m}"]["study"] = study.study_table(xq[ok], cfs, d["orig_pred"][HELD_OUT][ok],
                                                          d["cf_pred"][HELD_OUT][ok], aes, js["knn"])
    ex = Explainer.load(args.model, step=args.step, refine=args.refine, direction=args.direction, residual=args.residual)
    out = ex.explain(xq, target=q)
    x_cf = np.clip(out["x_cf"], 0.0, 1.0)
    x_cf = np.round(x_cf * 255.0) / 255.0  # quantised like the authors' files
    cf_class = ex.predict(x_cf)
    valid = (cf_class == q) & (out["y_pred"] != q)
    rows["cfjax ECINN"] = judge_row(js, x_cf, q, valid)
    rows["cfjax ECINN"]["study"] = study.study_table(xq, x_cf, out["y_pred"], cf_class, aes, js["knn"])
    rows["cfjax ECINN"]["mean_abs_change"] = round(float(np.mean(np.abs(x_cf - xq))), 4)
    rows["authors GEN"]["mean_abs_change"] = round(float(np.mean(np.abs(gen["cfs"][HELD_OUT].astype(np.float32)[..., None] / 255.0 - xq))), 4)
    rows["cfjax ECINN"]["model_accuracy_on_queries"] = round(float(np.mean(out["y_pred"] == yq)), 4)
    rows["cfjax ECINN"]["target_equals_prediction"] = int(np.sum(out["y_pred"] == q))
    # mnist5k test, --target next
    test = load_dataset("mnist5k", "test").take(300)
    o5 = ex.explain(test.images, target="next")
    x5 = np.clip(o5["x_cf"], 0.0, 1.0)
    rows["cfjax ECINN, mnist5k test 300, next"] = judge_row(js, x5, o5["y_target"], (ex.predict(x5) == o5["y_target"]))
    fake = fakemnist_rows(ref, args) if args.fakemnist_model else None
    result = {"model": str(args.model), "step": args.step, "refine": args.refine, "direction": args.direction, "residual": args.residual,
              "queries": "MNIST test 5000-9999, authors' targets", "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    if fake is not None:
        result["fakemnist_reference"] = fake
        print("FakeMNIST marker switched:", json.dumps({k: v["marker_switched"] for k, v in fake.items()}))
    for name, row in rows.items():
        cells = "  ".join(f"{k} {v['rate']:.3f}" for k, v in row.items() if isinstance(v, dict) and "rate" in v)
        if "study" in row:
            cells += "  " + "  ".join(f"{k} {v.get('mean', v.get('value')):.3f}" for k, v in row["study"].items())
        cells += "  " + "  ".join(f"{k} {v:.3f}" for k, v in row["texture"].items())
        print(f"{name:40s} {cells}")
        print(f"{'  both judges by target':40s} " + "  ".join(f"{t}: {v['judges_all_agree']:.2f}" for t, v in row["by_target"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = 20
        fig, ax = plt.subplots(3, k, figsize=(k * 0.8, 3 * 0.9))
        for i in range(k):
            for r, img in enumerate((xq[i], gen["cfs"][HELD_OUT][i] / 255.0, x_cf[i])):
                ax[r, i].imshow(np.squeeze(img), cmap="gray", vmin=0, vmax=1)
                ax[r, i].set_xticks([]), ax[r, i].set_yticks([])
            ax[0, i].set_title(f"{yq[i]}→{q[i]}", fontsize=8)
        for r, name in enumerate(("query", "authors", "cfjax")):
            ax[r, 0].set_ylabel(name, fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
    if args.png_by_target:
        by_target_figure(args.png_by_target, xq, gen["cfs"][HELD_OUT] / 255.0, x_cf, yq, q)
    return result


def first_per_target(target: np.ndarray, per_class: int) -> dict[int, np.ndarray]:
    """{class: positions of the first ``per_class`` queries with that target}, classes ascending;
    negative targets (skipped queries) are left out."""
    return {int(t): np.flatnonzero(target == t)[:per_class] for t in np.unique(target[target >= 0])}


def by_target_figure(path: str, xq: np.ndarray, authors: np.ndarray, ours: np.ndarray, y: np.ndarray, target: np.ndarray,
                     per_class: int = 6) -> None:
    """For each target class (a row), the first ``per_class`` queries sent there, each as a triple
    query | authors' GEN | cfjax. xq, ours (N, H, W, 1) and authors (N, H, W) in [0, 1]; y, target (N,)."""
    from cfjax.plotting import pyplot, save_figure, show_image

    plt = pyplot()
    picks = first_per_target(target, per_class)
    fig, ax = plt.subplots(len(picks), 3 * per_class, figsize=(3 * per_class * 0.62, len(picks) * 0.85))
    ax = np.atleast_2d(ax)
    for r, (t, idx) in enumerate(picks.items()):
        for j in range(per_class):
            for k in range(3):
                a = ax[r, 3 * j + k]
                if j < len(idx):
                    show_image(a, (xq, authors, ours)[k][idx[j]])
                    if k == 0:
                        a.set_title(f"{y[idx[j]]}→{t}", fontsize=6, pad=2)
                else:
                    a.axis("off")
            if r == len(picks) - 1:
                for k, name in enumerate(("query", "authors", "cfjax")):
                    ax[r, 3 * j + k].set_xlabel(name, fontsize=5, labelpad=1)
        ax[r, 0].set_ylabel(f"→ {t}", fontsize=8)
    fig.suptitle("held-out queries by target class: query | authors' GEN | cfjax", fontsize=9)
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.8, rect=(0, 0, 1, 0.96))
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
