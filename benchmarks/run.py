"""Run the cfjax-vs-PyTorch benchmarks: ``python -m benchmarks.run [ecinn|disc|train_flow|all] [--quick]``.

Each benchmark first asserts parity with its twin (AssertionError otherwise), then times, then
writes ``benchmarks/results/<name>_<device>.json`` and a ``.png`` plot next to it.
"""

from __future__ import annotations

import argparse
import os
import sys

NAMES = ("ecinn", "disc", "train_flow")


def _module(name: str):
    import importlib

    return importlib.import_module(f"benchmarks.bench_{name}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", nargs="?", default="all", choices=NAMES + ("all",), help="which benchmark (default all)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test, ~1 min)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/)")
    p.add_argument("--budget", type=float, default=200.0, help="skip a batch size whose estimated time exceeds this many seconds (default 200)")
    p.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")), default=None, help="comma-separated batch sizes instead of the defaults (e.g. 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per setting (default 5/3/7 for ecinn/disc/train_flow, 3 with --quick)")


def run(args) -> int:
    from benchmarks import common

    names = NAMES if args.which == "all" else (args.which,)
    for name in names:
        mod = _module(name)
        res = mod.run(quick=args.quick, budget_s=args.budget, repeats=args.repeats, sizes=getattr(args, "sizes", None))
        path = common.write_result(res, args.out_dir, mod.plot)
        sp = "n/a (headline batch skipped)" if res["speedup"] is None else f"{res['speedup']:.2f}x"
        verdict = "n/a" if res["target_met"] is None else ("met" if res["target_met"] else "missed")
        print(f"{name}: speedup {sp} at batch {res['headline']['batch']} (target {res['headline']['target_speedup']:.0f}x: {verdict}) -> {path}")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.strip().splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
