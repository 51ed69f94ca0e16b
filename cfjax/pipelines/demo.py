"""The one-command tour: ECINN on the shipped model, every class pair, pictures and a summary.

    cfjax demo [--out DIR] [--data mnist5k] [--per-class 5]

Writes into DIR (default ``cfjax-demo/``):
  pairs.png    one test image per class (rows) turned into every class (columns): all 90 pairs
  grid.png     query | counterfactual | difference | heatmap for 16 queries, target = next class
  demo.npz     the CF.npz of every (query, target) pair evaluated (see ``cfjax evaluate``)
  summary.json the numbers printed on screen
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.data import load_dataset
from cfjax.errors import CfjaxError
from cfjax.pipelines.explain_common import add_data_arguments, save_npz_atomic

XLA_WORKLOAD = "ecinn"  # XLA:CPU flags the cli applies for this command (cfjax.xla_cpu)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--model", default=None, help="flow model directory (default: the shipped one)")
    p.add_argument("--out", default="cfjax-demo", help="output directory (default ./cfjax-demo)")
    p.add_argument("--per-class", type=int, default=5, help="test queries per class for the validity matrix (default 5)")


def _pairs_figure(x_rows, x_all, y_pred, probs, path, title):
    from cfjax.plotting import _mpl, _show, save_figure

    plt = _mpl()
    c = x_all.shape[1]
    fig, axes = plt.subplots(c, c + 1, figsize=(1.1 * (c + 1), 1.15 * c + 0.5), squeeze=False)
    for r in range(c):
        _show(axes[r, 0], x_rows[r])
        axes[r, 0].set_ylabel(f"pred {int(y_pred[r])}", fontsize=7)
        for t in range(c):
            ax = axes[r, t + 1]
            _show(ax, x_all[r, t])
            if t == int(y_pred[r]):
                for s in ax.spines.values():
                    s.set_edgecolor("tab:blue")
                    s.set_linewidth(2)
            else:
                ok = int(np.argmax(probs[r, t])) == t
                ax.set_xlabel(f"{probs[r, t, t]:.2f}", fontsize=6, color="black" if ok else "red")
            if r == 0:
                ax.set_title(f"-> {t}", fontsize=8)
    axes[0, 0].set_title("query", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from cfjax.models import flow_classifier as fc
    from cfjax.pipelines.explain_ecinn import explain_arrays
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.plotting import save_counterfactual_grid
    from cfjax.pretrained import default_model_dir

    if args.per_class <= 0:
        raise CfjaxError(f"--per-class must be positive, got {args.per_class}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CfjaxError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or default_model_dir("flow", args.data)
    print(f"demo: loading {model_dir} and {args.data}/test", flush=True)
    params, config, info = load_flow(model_dir)
    test = load_dataset(args.data, "test", args.data_dir)
    c = config.num_classes

    # Accuracy of the shipped model on the whole test split.
    probs_fn = jax.jit(lambda x: fc.predict_proba(params, config, x))
    y_hat = np.concatenate([np.asarray(jnp.argmax(probs_fn(jnp.asarray(test.images[i : i + 500])), -1)) for i in range(0, len(test), 500)])
    accuracy = float(np.mean(y_hat == test.labels))

    # Validity matrix: per_class queries of each true class, each explained towards every other class.
    pick = np.concatenate([np.flatnonzero(test.labels == k)[: args.per_class] for k in range(c)])
    xq, yq = test.images[pick], test.labels[pick]
    n = len(pick)
    xs = np.repeat(xq, c, 0)
    targets = np.tile(np.arange(c, dtype=np.int32), n)
    print(f"demo: compiling ECINN (once), then {len(xs)} counterfactuals", flush=True)
    t0 = time.perf_counter()
    explain_arrays(params, config, xs[: min(len(xs), 256)], targets[: min(len(xs), 256)], batch_size=256)  # compile
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = explain_arrays(params, config, xs, targets, batch_size=256)
    seconds = time.perf_counter() - t0
    moved = res["y_pred"] != targets
    valid = res["y_cf_pred"] == targets
    validity = float(np.mean(valid[moved]))
    matrix = np.zeros((c, c))
    counts = np.zeros((c, c))
    np.add.at(matrix, (res["y_pred"][moved], targets[moved]), valid[moved])
    np.add.at(counts, (res["y_pred"][moved], targets[moved]), 1)
    save_npz_atomic(
        out / "demo.npz", x=xs[moved], y=np.repeat(yq, c)[moved], method=np.array("ecinn"), model=np.array(str(model_dir)),
        seconds=np.float32(seconds * moved.mean()), **{k: v[moved] for k, v in res.items()},
    )

    # Pictures: every class pair from one query per class, and a labelled grid.
    # The first test digit of each class that the model classifies correctly (a misclassified
    # query would label its row with another class).
    first = np.array([np.flatnonzero((test.labels == k) & (y_hat == k))[0] if np.any((test.labels == k) & (y_hat == k))
                      else np.flatnonzero(test.labels == k)[0] for k in range(c)])
    print("demo: drawing pairs.png and grid.png", flush=True)
    pairs = explain_arrays(params, config, np.repeat(test.images[first], c, 0), np.tile(np.arange(c, dtype=np.int32), c))
    x_all = pairs["x_cf"].reshape(c, c, *config.image_shape)
    probs_all = np.asarray(probs_fn(jnp.asarray(pairs["x_cf"]))).reshape(c, c, c)
    _pairs_figure(test.images[first], x_all, pairs["y_pred"][::c], probs_all, out / "pairs.png",
                  f"ECINN on {args.data}: one test digit per class (rows) turned into every class (columns); "
                  f"number = p(column class), red = not valid")
    g = explain_arrays(params, config, test.images[:16], "next")
    save_counterfactual_grid(out / "grid.png", test.images[:16], g["x_cf"], g["y_pred"], g["y_target"], g["y_cf_pred"],
                             heatmap=g["heatmap"], p_pred=g["p_pred"], p_cf=g["p_cf"], title="ECINN: target = next class")

    summary = {
        "model": str(model_dir),
        "data": args.data,
        "test_accuracy": accuracy,
        "test_bits_per_dim": info.get("metrics", {}).get("test_bits_per_dim"),
        "counterfactuals": int(moved.sum()),
        "validity": validity,
        "ms_per_counterfactual": 1000 * seconds / len(xs),
        "compile_seconds": t_compile,
        "mean_l1_per_pixel": float(np.mean(np.abs(res["x_cf"] - xs)[moved])),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    con = Console()
    tab = Table(title=f"cfjax demo: ECINN on {args.data} (shipped model)", show_header=False)
    tab.add_row("model test accuracy", f"{accuracy:.2%} on {len(test)} test images")
    if summary["test_bits_per_dim"] is not None:
        tab.add_row("model bits/dim", f"{summary['test_bits_per_dim']:.3f}")
    tab.add_row("counterfactuals", f"{int(moved.sum())} ({n} queries x every other class)")
    tab.add_row("validity (model predicts the target)", f"{validity:.2%}")
    tab.add_row("time per counterfactual (CPU)", f"{summary['ms_per_counterfactual']:.2f} ms (+ {t_compile:.1f}s compile once)")
    tab.add_row("mean |x_cf - x| per pixel", f"{summary['mean_l1_per_pixel']:.4f}")
    worst = np.where(counts > 0, matrix / np.maximum(counts, 1), 1.0)
    i, j = np.unravel_index(np.argmin(worst), worst.shape)
    tab.add_row("hardest pair", f"{i} -> {j}: {worst[i, j]:.0%} valid")
    tab.add_row("pictures", f"{out / 'pairs.png'}  {out / 'grid.png'}")
    tab.add_row("data", f"{out / 'demo.npz'}  (try: cfjax evaluate {out / 'demo.npz'})")
    con.print(tab)
    return 0
