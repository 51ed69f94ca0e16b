"""Benchmarks against the parity-checked PyTorch twins (needs a repository checkout and the bench extra).

    cfjax bench [ecinn|disc|train_flow|all] [--quick] [--out-dir DIR] [--budget S] [--repeats N]

The benchmarks live in the repository's ``benchmarks`` package (not in the installed library, and
never imported by it): ``cfjax bench`` runs ``python -m benchmarks.run`` in a subprocess from the
checkout. Each benchmark asserts that cfjax and its torch twin compute the same function, then
times both interleaved and writes ``benchmarks/results/<name>_<device>.json`` plus a plot.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from cfjax.errors import CfjaxError

NAMES = ("ecinn", "disc", "train_flow")


def checkout() -> Path:
    """The repository checkout holding ``benchmarks/run.py``: the current directory, or the one this
    cfjax was installed from (editable installs)."""
    for repo in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (repo / "benchmarks" / "run.py").is_file():
            return repo
    raise CfjaxError(
        "cfjax bench runs from a cfjax repository checkout (it needs the benchmarks/ folder, which is not "
        "part of the installed package): clone the repository, pip install -e '.[bench]', and run it there"
    )


def command(which: str, quick: bool = False, out_dir=None, budget: float = 200.0, sizes=None, repeats=None) -> list[str]:
    """The ``python -m benchmarks.run`` command line for these options."""
    argv = [sys.executable, "-m", "benchmarks.run", which, "--budget", str(budget)]
    if quick:
        argv.append("--quick")
    if out_dir is not None:
        argv += ["--out-dir", str(Path(out_dir).resolve())]
    if sizes:
        argv += ["--sizes", ",".join(str(b) for b in sizes)]
    if repeats is not None:
        argv += ["--repeats", str(repeats)]
    return argv


def run(args) -> int:
    """Check the requirements, then run the benchmarks in a subprocess; its exit status is returned."""
    missing = [m for m in ("torch", "FrEIA") if importlib.util.find_spec(m) is None]
    if missing:
        raise CfjaxError(f"cfjax bench needs {' and '.join(missing)}: pip install -e '.[bench]' (torch==2.13.0, freia)")
    if args.out_dir is not None and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise CfjaxError(f"--out-dir {args.out_dir} exists and is not a directory")
    repo = checkout()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p))
    argv = command(args.which, args.quick, args.out_dir, args.budget, getattr(args, "sizes", None), args.repeats)
    return subprocess.call(argv, cwd=repo, env=env)
