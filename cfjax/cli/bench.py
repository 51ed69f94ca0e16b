"""``cfjax bench``: the benchmarks against the PyTorch twins (see :mod:`cfjax.pipelines.bench`).

    cfjax bench [ecinn|disc|train_flow|all] [--quick] [--out-dir DIR] [--budget S] [--repeats N]
"""

from __future__ import annotations

import argparse

from cfjax.cli.common import POSITIVE_FLOAT, POSITIVE_INT


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers, got {text!r}")
    return sizes


def add_bench(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.bench import NAMES

    p.add_argument("which", nargs="?", default="all", choices=NAMES + ("all",), help="which benchmark (default all)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/ in the checkout)")
    p.add_argument("--budget", type=POSITIVE_FLOAT, default=200.0, help="skip a batch size whose estimated time exceeds this many seconds (default 200)")
    p.add_argument("--sizes", type=_sizes, default=None, help="comma-separated batch sizes instead of the defaults (e.g. 256)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=None, help="timed repeats per setting")


def run_bench(args) -> int:
    from cfjax.pipelines import bench

    return bench.run(args)
