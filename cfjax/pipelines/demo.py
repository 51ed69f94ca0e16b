"""The one-command tour: ECINN on the shipped model, every class pair, pictures and a summary.

    cfjax demo [--out DIR] [--data mnist5k] [--per-class 5]

Writes into DIR (default ``cfjax-demo/``):
  pairs.png    one test image per class (rows) turned into every class (columns): all 90 pairs
  grid.png     query | counterfactual | difference | heatmap for 16 queries, target = next class
  demo.npz     the CF.npz of every (query, target) pair evaluated (see ``cfjax evaluate``)
  summary.json the numbers printed on screen
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.batching import map_chunks
from cfjax.data import load_dataset
from cfjax.errors import CfjaxError
from cfjax.checkpoint import write_json_atomic
from cfjax.pipelines.explain_common import save_npz_atomic
from cfjax.validation import positive_int

PER_CLASS = 5  # test queries per class for the validity matrix


def _pairs_figure(x_rows, x_all, y_pred, probs, path, title):
    from cfjax.plotting import pyplot, save_figure, show_image

    plt = pyplot()
    c = x_all.shape[1]
    fig, axes = plt.subplots(c, c + 1, figsize=(1.1 * (c + 1), 1.15 * c + 0.5), squeeze=False)
    for r in range(c):
        show_image(axes[r, 0], x_rows[r])
        axes[r, 0].set_ylabel(f"pred {int(y_pred[r])}", fontsize=7)
        for t in range(c):
            ax = axes[r, t + 1]
            show_image(ax, x_all[r, t])
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


def run_demo(*, out="cfjax-demo", data: str = "mnist5k", data_dir=None, model=None, per_class: int = PER_CLASS,
             residual: float = 1.0) -> dict:
    """The tour: accuracy, a validity matrix of ``per_class`` test queries per class explained
    towards every other class, pictures and a summary, written into the directory ``out``.
    ``residual``: see :func:`cfjax.methods.ecinn.latent_step`. Returns the summary."""
    from cfjax import model_dirs
    from cfjax.methods.ecinn import check_residual
    from cfjax.models import flow_classifier as fc
    from cfjax.pipelines.explain_ecinn import explain_arrays
    from cfjax.pretrained import default_model_dir

    positive_int(per_class, "per_class")
    residual = check_residual(residual)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CfjaxError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model or default_model_dir("flow", data)
    print(f"demo: loading {model_dir} and {data}/test", flush=True)
    m = model_dirs.load("flow", model_dir)
    params, config, info = m.params, m.config, m.info
    test = load_dataset(data, "test", data_dir)
    c = config.num_classes

    # Accuracy of the shipped model on the whole test split.
    probs_fn = jax.jit(lambda x: fc.predict_proba(params, config, x))
    y_hat = map_chunks(lambda xb: jnp.argmax(probs_fn(jnp.asarray(xb)), -1), (test.images,), 500, pad=False)
    accuracy = float(np.mean(y_hat == test.labels))

    # Validity matrix: per_class queries of each true class, each explained towards every other class.
    pick = np.concatenate([np.flatnonzero(test.labels == k)[: per_class] for k in range(c)])
    xq, yq = test.images[pick], test.labels[pick]
    n = len(pick)
    xs = np.repeat(xq, c, 0)
    targets = np.tile(np.arange(c, dtype=np.int32), n)
    print(f"demo: compiling ECINN (once), then {len(xs)} counterfactuals", flush=True)
    t0 = time.perf_counter()
    explain_arrays(params, config, xs[: min(len(xs), 256)], targets[: min(len(xs), 256)], batch_size=256, residual=residual)  # compile
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = explain_arrays(params, config, xs, targets, batch_size=256, residual=residual)
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

    _pictures(out, params, config, test, y_hat, probs_fn, data, residual)

    summary = {
        "model": str(model_dir),
        "data": data,
        "residual": residual,
        "test_accuracy": accuracy,
        "test_bits_per_dim": info.get("metrics", {}).get("test_bits_per_dim"),
        "counterfactuals": int(moved.sum()),
        "validity": validity,
        "ms_per_counterfactual": 1000 * seconds / len(xs),
        "compile_seconds": t_compile,
        "mean_l1_per_pixel": float(np.mean(np.abs(res["x_cf"] - xs)[moved])),
    }
    write_json_atomic(out / "summary.json", summary)

    _print_summary(summary, len(test), n, matrix, counts, out)
    return summary


def _pictures(out: Path, params, config, test, y_hat, probs_fn, data: str, residual: float = 1.0) -> None:
    """pairs.png (every class pair from one query per class) and grid.png (16 queries, target =
    next class)."""
    from cfjax.pipelines.explain_ecinn import explain_arrays
    from cfjax.plotting import save_counterfactual_grid

    c = config.num_classes
    # The first test digit of each class that the model classifies correctly (a misclassified
    # query would label its row with another class).
    first = np.array([np.flatnonzero((test.labels == k) & (y_hat == k))[0] if np.any((test.labels == k) & (y_hat == k))
                      else np.flatnonzero(test.labels == k)[0] for k in range(c)])
    print("demo: drawing pairs.png and grid.png", flush=True)
    pairs = explain_arrays(params, config, np.repeat(test.images[first], c, 0), np.tile(np.arange(c, dtype=np.int32), c), residual=residual)
    x_all = pairs["x_cf"].reshape(c, c, *config.image_shape)
    probs_all = np.asarray(probs_fn(jnp.asarray(pairs["x_cf"]))).reshape(c, c, c)
    _pairs_figure(test.images[first], x_all, pairs["y_pred"][::c], probs_all, out / "pairs.png",
                  f"ECINN on {data}{'' if residual == 1.0 else f' (residual {residual:g})'}: one test digit per class (rows) "
                  f"turned into every class (columns); number = p(column class), red = not valid")
    g = explain_arrays(params, config, test.images[:16], "next", residual=residual)
    save_counterfactual_grid(out / "grid.png", test.images[:16], g["x_cf"], g["y_pred"], g["y_target"], g["y_cf_pred"],
                             heatmap=g["heatmap"], p_pred=g["p_pred"], p_cf=g["p_cf"], title="ECINN: target = next class")


def _print_summary(summary: dict, n_test: int, n: int, matrix: np.ndarray, counts: np.ndarray, out: Path) -> None:
    """The demo's table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    tab = Table(title=f"cfjax demo: ECINN on {summary['data']} (shipped model)", show_header=False)
    tab.add_row("model test accuracy", f"{summary['test_accuracy']:.2%} on {n_test} test images")
    if summary["test_bits_per_dim"] is not None:
        tab.add_row("model bits/dim", f"{summary['test_bits_per_dim']:.3f}")
    tab.add_row("counterfactuals", f"{summary['counterfactuals']} ({n} queries x every other class)"
                + ("" if summary.get("residual", 1.0) == 1.0 else f", residual {summary['residual']:g}"))
    tab.add_row("validity (model predicts the target)", f"{summary['validity']:.2%}")
    tab.add_row("time per counterfactual (CPU)", f"{summary['ms_per_counterfactual']:.2f} ms (+ {summary['compile_seconds']:.1f}s compile once)")
    tab.add_row("mean |x_cf - x| per pixel", f"{summary['mean_l1_per_pixel']:.4f}")
    worst = np.where(counts > 0, matrix / np.maximum(counts, 1), np.inf)  # pairs never asked for are not candidates
    i, j = np.unravel_index(np.argmin(worst), worst.shape)
    tab.add_row("hardest pair", f"{i} -> {j}: {worst[i, j]:.0%} valid" if worst[i, j] < 1 else "none: every pair 100% valid")
    tab.add_row("pictures", f"{out / 'pairs.png'}  {out / 'grid.png'}")
    tab.add_row("data", f"{out / 'demo.npz'}  (try: cfjax evaluate {out / 'demo.npz'})")
    con.print(tab)
