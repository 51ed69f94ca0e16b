"""The `cfjax` command line. Parsing only: every command calls into cfjax.pipelines.

Commands are plug-ins: each module named below exposes ``add_arguments(parser)`` and
``run(args) -> int``. Any :class:`~cfjax.errors.CfjaxError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

TRAINERS = {
    "flow": ("cfjax.pipelines.train_flow", "train the Glow generative classifier ECINN explains"),
    "classifier": ("cfjax.pipelines.train_classifier", "train the BatchNorm CNN classifier DISC explains"),
    "duq": ("cfjax.pipelines.train_duq", "train the DUQ manifold-consistency model DISC uses"),
}
EXPLAINERS = {
    "ecinn": ("cfjax.pipelines.explain_ecinn", "closed-form counterfactuals from the invertible classifier"),
    "disc": ("cfjax.pipelines.explain_disc", "counterfactuals for a BatchNorm classifier by deep model inversion"),
}
TOP = {
    "demo": ("cfjax.pipelines.demo", "explain a sample of every class pair with the shipped model; write grids + summary"),
    "evaluate": ("cfjax.pipelines.evaluate", "metrics table for a CF.npz from any method"),
    "bench": ("cfjax.pipelines.bench", "benchmarks against the PyTorch twins"),
}


def _add_group(sub, table: dict) -> None:
    for name, (module, help_) in table.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # command not built into this version
                continue
            raise
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _xla_workload=getattr(mod, "XLA_WORKLOAD", None))


class _Parser(argparse.ArgumentParser):
    """argparse with the house error style: one line ``cfjax: error: ...`` and exit 2, no usage block."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"cfjax: error: {message} (see `{self.prog} --help`)\n")


def _non_finite_option(args) -> str | None:
    """Every float option must be finite: a NaN or inf is refused by its flag name, before any work."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name.replace('_', '-')} must be a finite number, got {value}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cfjax", description="Counterfactual explanations for image classifiers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="model_kind", required=True)
    _add_group(train, TRAINERS)
    explain = sub.add_parser("explain", help="generate counterfactuals").add_subparsers(dest="method", required=True)
    _add_group(explain, EXPLAINERS)
    _add_group(sub, TOP)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cfjax.errors import CfjaxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    bad = _non_finite_option(args)
    if bad:
        print(f"cfjax: error: {bad}", file=sys.stderr)
        return 2
    from cfjax import xla_cpu

    xla_cpu.apply(getattr(args, "_xla_workload", None))  # before anything computes: XLA reads its flags once
    try:
        return int(args._run(args) or 0)
    except CfjaxError as e:
        print(f"cfjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable, missing, read-only or full locations: one line naming the path
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"cfjax: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cfjax: interrupted; outputs are written atomically, so nothing half-written was left "
              "(training runs and shard directories continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
