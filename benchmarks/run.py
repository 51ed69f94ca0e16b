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


def _argv_for(name: str, args) -> list[str]:
    """The command line that runs one benchmark with ``args``' options (for a fresh process)."""
    argv = [name]
    if args.quick:
        argv.append("--quick")
    if args.out_dir is not None:
        argv += ["--out-dir", str(args.out_dir)]
    argv += ["--budget", str(args.budget)]
    if getattr(args, "sizes", None):
        argv += ["--sizes", ",".join(str(b) for b in args.sizes)]
    if args.repeats is not None:
        argv += ["--repeats", str(args.repeats)]
    return argv


def run(args) -> int:
    """One benchmark in this process; ``all`` runs each in a fresh process, so that each gets the
    XLA:CPU flags cfjax uses for that workload (cfjax.xla_cpu; XLA reads them once per process)."""
    import subprocess
    from pathlib import Path

    if args.which == "all":
        repo = Path(__file__).resolve().parents[1]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        failed = [name for name in NAMES if subprocess.call([sys.executable, "-m", "benchmarks.run", *_argv_for(name, args)], env=env) != 0]
        if failed:
            print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0

    from cfjax import xla_cpu

    xla_cpu.apply(args.which)  # no effect if a JAX backend already exists in this process
    from benchmarks import common

    mod = _module(args.which)
    res = mod.run(quick=args.quick, budget_s=args.budget, repeats=args.repeats, sizes=getattr(args, "sizes", None))
    path = common.write_result(res, args.out_dir, mod.plot)
    for label, part in ((args.which, res), (f"{args.which} (IB-INN flow)", res.get("ibinn"))):
        if not part or "speedup" not in part:
            continue
        sp = "n/a (headline batch skipped)" if part["speedup"] is None else f"{part['speedup']:.2f}x"
        verdict = "n/a" if part["target_met"] is None else ("met" if part["target_met"] else "missed")
        print(f"{label}: speedup {sp} at batch {part['headline']['batch']} (target {part['headline']['target_speedup']:g}x: {verdict}) -> {path}")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.strip().splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
