"""DISC ablation on mnist5k: which parts make counterfactuals that read as the target digit?

    python examples/disc_ablation.py [--limit 64] [--variants all|name,name,...] [--out examples/results]

Runs every variant on the same test queries (the first ``--limit`` of mnist5k/test, target =
(predicted class + 1) mod 10) with the shipped classifier, and reports:

- flip rate: the explained classifier predicts the target on x_cf;
- oracle agreement: an independently trained classifier of another architecture (the shipped
  ``mnist5k_oracle``, a ResNet) also predicts the target; the closest automatic stand-in for
  "a person reads it as the target digit";
- proximity: l1 (sum over pixels) and l2 distance to the query; sparsity: fraction of pixels
  changed by more than 0.1;
- realism: l2 distance to the nearest real *training* image of the target class, and the DUQ
  certainty K_{y'}(x_cf) of the target class (not independent for the variants that optimise
  the DUQ term);
- seconds per counterfactual (wall time of the whole variant / N, compilation included).

Writes ``disc_ablation.json``, ``disc_ablation.md`` (a table) and ``disc_ablation.png`` (the
variants side by side on a few queries). The CLI defaults (``DISCConfig()`` and ``--manifold
duq``) are the row marked "CLI default", chosen from this table and the picture.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cfjax import metrics  # noqa: E402
from cfjax.data import load_dataset  # noqa: E402
from cfjax.methods.disc import DISCConfig  # noqa: E402
from cfjax.models.duq import duq_kernel  # noqa: E402
from cfjax.pipelines.explain_disc import duq_from_dir, explain_arrays, predict_proba_batched  # noqa: E402
from cfjax.pipelines.train_classifier import load_classifier  # noqa: E402
from cfjax.pipelines.train_duq import load_duq  # noqa: E402
from cfjax.pretrained import default_model_dir  # noqa: E402

# DeepInversion-style baseline: cross-entropy + BN statistics + TV + l2 prior, pixels, one stage.
BASE = dict(prior="pixels", progressive=False, lambda_l1=0.0, lambda_feat=0.0, lambda_mc=0.0,
            lambda_bn=0.01, lambda_tv=1.0, lambda_l2=0.05, jitter=0)
L1 = {**BASE, "lambda_l1": 0.5}
PROG = dict(progressive=True, stages=(0.5, 0.9, 0.999))

# name -> (DISCConfig overrides, use the DUQ model, description). Each row of the ladder adds one
# thing to the row before; the extra rows put single parts back or away from the full system.
VARIANTS = {
    "pixels": (dict(BASE), False, "pixels only (DeepInversion-style: CE + BN + TV + l2)"),
    "+l1": (dict(L1), False, "+ l1 proximity to the query"),
    "+dip": ({**L1, "prior": "dip"}, False, "+ DIP prior (instead of pixels)"),
    "+inr": ({**L1, "prior": "inr"}, False, "+ INR prior (instead of pixels)"),
    "+inr+duq": ({**L1, "prior": "inr", "lambda_mc": 1.0}, True, "+ INR, + manifold (DUQ)"),
    "+inr+duq+prog": ({**L1, "prior": "inr", "lambda_mc": 1.0, **PROG}, True, "+ INR, + DUQ, + progressive"),
    "default, bn batch": ({**L1, "prior": "inr", "lambda_mc": 1.0, **PROG, "bn_convention": "batch"}, True,
                          "the default with per-batch BN statistics (64 queries jointly)"),
    "pixels+duq+prog": ({**L1, "lambda_mc": 1.0, **PROG}, True, "full objective with the pixels prior"),
    "pixels+duq+prog+c2f": ({**L1, "lambda_mc": 1.0, **PROG, "coarse_to_fine": True}, True, "... + coarse-to-fine"),
    "+inr+duq+prog+jitter": ({**L1, "prior": "inr", "lambda_mc": 1.0, **PROG, "jitter": 2}, True,
                             "+ INR, + DUQ, + progressive, + jitter 2"),
    "+dip+duq+prog+jitter": ({**L1, "prior": "dip", "lambda_mc": 1.0, **PROG, "jitter": 2}, True,
                             "+ DIP, + DUQ, + progressive, + jitter 2"),
}
DEFAULT_ROW = "+dip+duq+prog+jitter"  # == DISCConfig() with --manifold duq (checked in main)


def run_variant(name, overrides, use_duq, ctx, limit):
    cfg = DISCConfig(**overrides) if overrides else DISCConfig()
    duq = ctx["duq"] if use_duq else None
    if not use_duq:
        cfg = cfg.replace(lambda_mc=0.0)
    x, t = ctx["x"][:limit], ctx["targets"][:limit]
    t0 = time.perf_counter()
    res = explain_arrays(ctx["apply_fn"], ctx["variables"], x, t, cfg, duq, batch_size=256, quiet=False)
    seconds = time.perf_counter() - t0
    x_cf = res["x_cf"]
    k = np.asarray(duq_kernel(ctx["duq_vars"], ctx["duq_config"], jnp.asarray(x_cf)))
    oracle_pred = np.argmax(predict_proba_batched(ctx["oracle_fn"], ctx["oracle_vars"], x_cf), -1)
    row = {
        "variant": name,
        "flip_rate": float(np.mean(res["y_cf_pred"] == t)),
        "oracle_agreement": float(np.mean(oracle_pred == t)),
        "proximity_l1": float(metrics.proximity_l1(x, x_cf)),
        "proximity_l2": float(metrics.proximity_l2(x, x_cf)),
        "sparsity": float(metrics.sparsity(x, x_cf, 0.1)),
        "nn_distance_target": float(metrics.nearest_neighbour_distance(x_cf, ctx["train"].images, ctx["train"].labels, t)),
        "duq_certainty_target": float(np.mean(k[np.arange(len(t)), t])),
        "seconds_per_cf": seconds / len(x),
        "uses_duq": use_duq,
        "config": {kk: (list(v) if isinstance(v, tuple) else v) for kk, v in cfg.__dict__.items()},
    }
    return row, x_cf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--variants", default="all")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="disc_ablation", help="output file stem")
    p.add_argument("--show", type=int, default=8, help="queries in the PNG")
    args = p.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    is_default = DISCConfig(**VARIANTS[DEFAULT_ROW][0]) == DISCConfig()
    print(f"row {DEFAULT_ROW!r} {'is' if is_default else 'is NOT'} the CLI default DISCConfig()")

    apply_fn, variables, _, _ = load_classifier(default_model_dir("classifier", "mnist5k"))
    oracle_fn, oracle_vars, oracle_cfg, _ = load_classifier(default_model_dir("oracle", "mnist5k"))
    duq_dir = default_model_dir("duq", "mnist5k")
    duq_vars, duq_config, _ = load_duq(duq_dir)
    test = load_dataset("mnist5k", "test").take(args.limit)
    train = load_dataset("mnist5k", "train")
    y_pred = np.argmax(predict_proba_batched(apply_fn, variables, test.images), -1)
    ctx = dict(apply_fn=apply_fn, variables=variables, oracle_fn=oracle_fn, oracle_vars=oracle_vars,
               duq=duq_from_dir(duq_dir), duq_vars=duq_vars, duq_config=duq_config, x=test.images,
               targets=((y_pred + 1) % 10).astype(np.int32), train=train)

    rows, images = [], {}
    for name in names:
        overrides, use_duq, desc = VARIANTS[name]
        print(f"== {name}: {desc}", flush=True)
        row, x_cf = run_variant(name, overrides, use_duq, ctx, args.limit)
        row["description"] = desc + (" **(CLI default)**" if name == DEFAULT_ROW and is_default else "")
        rows.append(row)
        images[name] = x_cf
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("config", "description")}, flush=True)

    meta = {
        "command": "python examples/disc_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "queries": f"mnist5k test, first {args.limit}, target = (prediction + 1) mod 10",
        "classifier": str(default_model_dir("classifier", "mnist5k").name),
        "oracle": f"{default_model_dir('oracle', 'mnist5k').name} ({oracle_cfg.arch})",
        "duq": duq_dir.name,
        "machine": f"{platform.machine()} CPU x{os.cpu_count()} (shared), jax {jax.__version__}",
    }
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = [("flip_rate", "flip", "{:.3f}"), ("oracle_agreement", "oracle", "{:.3f}"), ("proximity_l1", "l1", "{:.1f}"),
            ("proximity_l2", "l2", "{:.2f}"), ("sparsity", "sparsity", "{:.3f}"), ("nn_distance_target", "NN dist", "{:.2f}"),
            ("duq_certainty_target", "DUQ K_y'", "{:.3f}"), ("seconds_per_cf", "s/CF", "{:.2f}")]
    lines = [f"# DISC ablation ({meta['queries']})", "", f"`{meta['command']}` on {meta['machine']}.", "",
             "| variant | " + " | ".join(c[1] for c in cols) + " | what |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f.format(r[k]) for k, _, f in cols) + f" | {r['description']} |")
    lines += ["", "flip: classifier predicts the target; oracle: an independent ResNet agrees; l1/l2: distance to the",
              "query (sum over pixels / Euclidean); sparsity: fraction of pixels changed by > 0.1; NN dist: l2 to the",
              "nearest training image of the target class; DUQ K_y': DUQ kernel of the target (optimised by the",
              "+duq variants, so not independent there); s/CF: wall seconds per counterfactual incl. compilation."]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    _figure(out / f"{args.tag}.png", test.images, ctx["targets"], images, args.show)
    print("\n".join(lines))
    return 0


def _figure(path, x, targets, images, show):
    from cfjax.plotting import _mpl, save_figure

    plt = _mpl()
    names = list(images)
    n = min(show, len(x))
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.3 * (len(names) + 1), 1.35 * n + 0.4), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(x[i, ..., 0], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(f"-> {targets[i]}", fontsize=8)
        for j, name in enumerate(names, 1):
            axes[i, j].imshow(images[name][i, ..., 0], cmap="gray", vmin=0, vmax=1)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["query"] + names):
        axes[0, j].set_title(name, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
