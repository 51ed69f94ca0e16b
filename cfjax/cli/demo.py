"""``cfjax demo``: the one-command tour of :mod:`cfjax.pipelines.demo`.

    cfjax demo [--out DIR] [--data mnist5k] [--per-class 5] [--residual 1]

Writes into DIR (default ``cfjax-demo/``) pairs.png, grid.png, demo.npz and summary.json.
"""

from __future__ import annotations

import argparse

from cfjax.cli.common import POSITIVE_INT, RESIDUAL, add_data


def add_demo(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.demo import PER_CLASS

    add_data(p)
    p.add_argument("--model", default=None, help="flow model directory (default: the shipped one)")
    p.add_argument("--out", default="cfjax-demo", help="output directory (default ./cfjax-demo)")
    p.add_argument("--per-class", type=POSITIVE_INT, default=PER_CLASS, help=f"test queries per class for the validity matrix (default {PER_CLASS})")
    p.add_argument("--residual", type=RESIDUAL, default="1",
                   help="share in [0, 1] of each query's style (its latent offset from its class mean) kept; see cfjax explain ecinn (default 1, the paper)")


def run_demo(args) -> int:
    from cfjax.pipelines.demo import run_demo as demo

    demo(out=args.out, data=args.data, data_dir=args.data_dir, model=args.model, per_class=args.per_class, residual=args.residual)
    return 0
