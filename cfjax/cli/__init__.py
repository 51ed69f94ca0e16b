"""The `cfjax` command line: flags in, config dataclasses out, one line per error.

Each command is an ``add_<name>(parser)`` / ``run_<name>(args) -> int`` pair in a module of this
package (train, explain, evaluate, demo, bench); the shared flags and their argparse types live
in :mod:`cfjax.cli.common`. A :class:`~cfjax.errors.CfjaxError` or an ``OSError`` becomes one
line on stderr and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (group, name): (module, help, XLA:CPU workload the command runs; see cfjax.xla_cpu)
COMMANDS = {
    ("train", "flow"): ("cfjax.cli.train", "train the Glow generative classifier ECINN explains", "train_flow"),
    ("train", "classifier"): ("cfjax.cli.train", "train the BatchNorm CNN classifier DISC explains", None),
    ("train", "duq"): ("cfjax.cli.train", "train the DUQ manifold-consistency model DISC uses", None),
    ("explain", "ecinn"): ("cfjax.cli.explain", "closed-form counterfactuals from the invertible classifier", "ecinn"),
    ("explain", "disc"): ("cfjax.cli.explain", "counterfactuals for a BatchNorm classifier by deep model inversion", "disc"),
    (None, "demo"): ("cfjax.cli.demo", "explain a sample of every class pair with the shipped model; write grids + summary", "ecinn"),
    (None, "evaluate"): ("cfjax.cli.evaluate", "metrics table for a CF.npz from any method", None),
    (None, "bench"): ("cfjax.cli.bench", "benchmarks against the PyTorch twins", None),
}
GROUPS = {"train": ("model_kind", "train a model"), "explain": ("method", "generate counterfactuals")}


class _Parser(argparse.ArgumentParser):
    """argparse with the house error style: one line ``cfjax: error: ...`` and exit 2, no usage block.

    A value refused by a :mod:`cfjax.cli.common` type reads ``--flag must be ..., got 'text'``.
    """

    def error(self, message: str):  # noqa: D102
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("argument ") and rest.startswith("must be "):  # a refused value: says it all
            self.exit(2, f"cfjax: error: {head[len('argument '):].split('/')[0]} {rest}\n")
        self.exit(2, f"cfjax: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cfjax", description="Counterfactual explanations for image classifiers in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {}
    for (group, name), (module, help_, workload) in COMMANDS.items():
        if group is None:
            where = sub
        else:
            if group not in groups:
                dest, ghelp = GROUPS[group]
                groups[group] = sub.add_parser(group, help=ghelp).add_subparsers(dest=dest, required=True)
            where = groups[group]
        mod = importlib.import_module(module)
        p = where.add_parser(name, help=help_, description=help_)
        getattr(mod, f"add_{name}")(p)
        flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help"}
        flags.update(getattr(mod, "FLAGS", {}))  # config fields whose flag has another name
        p.set_defaults(_run=getattr(mod, f"run_{name}"), _xla_workload=workload, _flags=flags)
    return parser


INTERRUPTED_MESSAGE = ("cfjax: interrupted; nothing half-written was left (outputs are written atomically): a training "
                       "run or a --shards directory continues with --resume, a single --out file is made by running "
                       "the command again")
_interrupts: list[int] = []
_caught: list[bool] = []  # main has caught the KeyboardInterrupt: no more are raised
_terminal_fd: list[int] = []  # the real stderr, kept aside once Ctrl-C has muted file descriptor 2


def _mute_stderr() -> None:
    """After Ctrl-C only the one "interrupted" line may reach the terminal: library threads that
    are still winding down (Orbax's event loop, XLA) can print tracebacks of their own meanwhile,
    so file descriptor 2 goes to /dev/null and the line is written to a saved copy of it."""
    if _terminal_fd:
        return
    try:
        sys.stderr.flush()
        _terminal_fd.append(os.dup(2))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _in_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _unraisable(info) -> None:
    """A KeyboardInterrupt raised where Python cannot propagate it (a gc callback, a __del__):
    deliver it again 50 ms later instead of printing it."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    sys.__unraisablehook__(info)


def _on_signal(signum, frame):
    """SIGINT: raise KeyboardInterrupt, but never inside an import (an exception raised into a
    native module's initialisation can abort the process): there, retry every 50 ms (SIGALRM)."""
    import signal

    if signum == signal.SIGINT:
        _interrupts.append(signum)  # remembered even if a library swallows the KeyboardInterrupt
        _mute_stderr()
    if not _interrupts or _caught:
        return
    # Look again in 50 ms, until main has caught one: a library may swallow this KeyboardInterrupt
    # (a bare ``except:`` around its work), and the command must not go on to write its output.
    # Inside an import wait; while one is being handled (its ``except`` / ``finally`` clean-up,
    # e.g. removing a temporary file) never raise a second.
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    if _in_import(frame) or isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command. From the shell (``argv`` None) Ctrl-C prints one line and exits 130 at once,
    without interpreter teardown (XLA's threads can crash a teardown that races them)."""
    import signal
    import threading

    from_shell = argv is None
    _caught.clear()
    if from_shell and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGALRM, _on_signal)
        sys.unraisablehook = _unraisable
    try:
        try:
            code = _main(argv)
        finally:
            _caught.append(True)
    except KeyboardInterrupt:
        code = 130
    _caught.append(True)
    if from_shell and _interrupts:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if _interrupts:
        code = 130
    if code == 130:
        if _terminal_fd:
            os.write(_terminal_fd[0], (INTERRUPTED_MESSAGE + "\n").encode())
        else:
            print(INTERRUPTED_MESSAGE, file=sys.stderr)
        if from_shell:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    return code


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cfjax.errors import CfjaxError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    from cfjax import xla_cpu

    xla_cpu.apply(getattr(args, "_xla_workload", None))  # before anything computes: XLA reads its flags once
    try:
        return int(args._run(args) or 0)
    except CfjaxError as e:
        flag = getattr(args, "_flags", {}).get(e.argument) if e.argument else None
        print(f"cfjax: error: {e}" + (f" (flag {flag})" if flag and flag not in str(e) else ""), file=sys.stderr)
        return 2
    except OSError as e:  # unwritable, missing, read-only or full locations: one line naming the path
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"cfjax: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
