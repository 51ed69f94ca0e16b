"""Benchmarks against the parity-checked PyTorch twins (needs a repository checkout and the bench extra).

    cfjax bench [ecinn|disc|train_flow|all] [--quick] [--out-dir DIR] [--budget S] [--repeats N]

The benchmarks live in the repository's ``benchmarks`` package (not in the installed library):
each asserts that cfjax and its torch twin compute the same function, then times both
interleaved and writes ``benchmarks/results/<name>_<device>.json`` plus a plot. Same as
``python -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from cfjax.errors import CfjaxError

NAMES = ("ecinn", "disc", "train_flow")


def _import_benchmarks():
    """The repository's ``benchmarks.run``: importable as is, or next to this cfjax checkout."""
    missing = [m for m in ("torch", "FrEIA") if importlib.util.find_spec(m) is None]
    if missing:
        raise CfjaxError(f"cfjax bench needs {' and '.join(missing)}: pip install -e '.[bench]' (torch==2.13.0, freia)")
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.run"):
            raise
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks" / "run.py").is_file():
        sys.path.insert(0, str(repo))
        return importlib.import_module("benchmarks.run")
    raise CfjaxError(
        "cfjax bench runs from a cfjax repository checkout (it needs the benchmarks/ folder, which is not "
        "part of the installed package): clone the repository, pip install -e '.[bench]', and run it there"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", nargs="?", default="all", choices=NAMES + ("all",), help="which benchmark (default all)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/ in the checkout)")
    p.add_argument("--budget", type=float, default=200.0, help="skip a batch size whose estimated time exceeds this many seconds (default 200)")
    p.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")), default=None, help="comma-separated batch sizes instead of the defaults (e.g. 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting")


def run(args) -> int:
    if args.budget <= 0:
        raise CfjaxError(f"--budget must be positive, got {args.budget}")
    if args.repeats is not None and args.repeats < 1:
        raise CfjaxError(f"--repeats must be at least 1, got {args.repeats}")
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise CfjaxError(f"--out-dir {args.out_dir} exists and is not a directory")
    return _import_benchmarks().run(args)
