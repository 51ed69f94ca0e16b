"""``cfjax evaluate CF.npz|SHARD_DIR``: the metrics table of :mod:`cfjax.pipelines.evaluate`.

    cfjax evaluate CF.npz|SHARD_DIR [--json OUT] [--oracle DIR|none] [--flow DIR|none] [--model DIR|auto|none]
                          [--data mnist5k|none] [--threshold 0.1] [--pca-k 50] [--heatmap-limit 64] [--judges rbf,knn] [--study]
"""

from __future__ import annotations

import argparse
import inspect

from cfjax.cli.common import NON_NEGATIVE_INT, POSITIVE_INT, FINITE_FLOAT, add_batch_size, add_seed


def _defaults() -> dict:
    from cfjax.pipelines.evaluate import evaluate_file

    return {k: v.default for k, v in inspect.signature(evaluate_file).parameters.items() if v.default is not inspect.Parameter.empty}


def add_evaluate(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("cf", metavar="CF.npz", help="counterfactuals written by `cfjax explain <method> --out`: a CF.npz, or a shard directory (or its manifest.json) written with --shards")
    p.add_argument("--json", default=None, help="also write the metrics as JSON to this path")
    p.add_argument("--data", default=d["data"], help=f"dataset the counterfactuals come from: its train split is the realism reference; 'none' skips realism (default {d['data']})")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets directory holding a prepared copy (never downloads)")
    p.add_argument("--oracle", default=None, help="independent classifier directory, or 'none' (default: the shipped <data>_oracle when there is one)")
    p.add_argument("--flow", default=None, help="flow model directory for bits/dim, or 'none' (default: the shipped <data>_flow when there is one)")
    p.add_argument("--model", default=d["model"], help="the explained model, for heatmap deletion/insertion: DIR, 'auto' (the model the CF.npz names, default) or 'none'")
    p.add_argument("--threshold", type=FINITE_FLOAT, default=d["threshold"], help=f"change above which a pixel counts as changed for sparsity (default {d['threshold']})")
    p.add_argument("--pca-k", type=POSITIVE_INT, default=d["pca_k"], help=f"principal components for pca_error (default {d['pca_k']})")
    p.add_argument("--heatmap-limit", type=NON_NEGATIVE_INT, default=d["heatmap_limit"], help=f"queries used for the heatmap curves (default {d['heatmap_limit']}; 0 skips them)")
    p.add_argument("--steps", type=POSITIVE_INT, default=d["steps"], help=f"deletion/insertion steps (default {d['steps']})")
    p.add_argument("--ig-steps", type=POSITIVE_INT, default=d["ig_steps"], help=f"integrated-gradients steps (default {d['ig_steps']})")
    add_batch_size(p, d["batch_size"], f"images per model call (default {d['batch_size']})")
    p.add_argument("--judges", default=d["judges"], help=f"pixel-space judges of other model families, fit on --data's train split and cached under ~/.cache/cfjax: a comma list of rbf, knn, or 'none' (default {d['judges']}; single CF.npz files only)")
    p.add_argument("--study", action="store_true", help="add the ECINN authors' evaluation-study columns: ElasticNet, IM1 and IM2 (per-class autoencoders fit on --data's train split, cached like the judges; ~5 min the first time on 2 CPU cores) and a Frechet distance in the k-NN judge's PCA space (single CF.npz files only)")
    add_seed(p, "seed of the random baseline heatmap (default 0)")


def run_evaluate(args) -> int:
    from cfjax.pipelines.evaluate import evaluate_file

    evaluate_file(
        args.cf, json=args.json, data=None if str(args.data).lower() == "none" else args.data, data_dir=args.data_dir,
        oracle=args.oracle, flow=args.flow, model=args.model, threshold=args.threshold, pca_k=args.pca_k,
        heatmap_limit=args.heatmap_limit, steps=args.steps, ig_steps=args.ig_steps, batch_size=args.batch_size,
        judges=args.judges, study=args.study, seed=args.seed,
    )
    return 0
