"""Ctrl-C at any moment of a command: one line, exit 130, no output or temporary file left, and
no crash in interpreter teardown (which XLA's threads can cause)."""

import signal
import subprocess
import sys
import time

import pytest


def _interpreter_start_s() -> float:
    """Seconds until a fresh interpreter has imported ``cfjax.cli`` (best of 3) and exited.

    Before that point no cfjax code has run, so a Ctrl-C there is Python's own (a traceback and
    exit -2) for any program; on a loaded machine start-up alone can take longer than 0.1 s."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cfjax.cli"], check=True)
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="module")
def start_s():
    return _interpreter_start_s()


# after the interpreter is up: during start-up (argument parsing, JAX import), loading/compiling, computing
@pytest.mark.parametrize("after", [0.05, 0.4, 1.4, 2.9, 7.9])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, after, start_s):
    out = tmp_path / "cf.npz"
    p = subprocess.Popen([sys.executable, "-m", "cfjax.cli", "explain", "ecinn", "--limit", "2000", "--quiet",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(start_s + after)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 130, (p.returncode, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("cfjax: interrupted"), stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


SWALLOWING_COMMAND = """
import os, signal, sys, time
from pathlib import Path
import cfjax.cli as cli

def command(argv):
    try:  # a library that swallows the first KeyboardInterrupt (a bare except around its work)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    except BaseException:
        pass
    time.sleep(2.0)  # the work goes on...
    Path(sys.argv[1]).write_text("written")  # ... and would write its output
    return 0

cli._main = command
cli.main()
"""


def test_ctrl_c_swallowed_by_a_library_still_stops_the_command(tmp_path):
    """A KeyboardInterrupt that a library swallows is raised again (every 50 ms until caught): the
    command stops with the one line and exit 130 instead of finishing its work."""
    out = tmp_path / "out.txt"
    p = subprocess.run([sys.executable, "-c", SWALLOWING_COMMAND, str(out)], capture_output=True, text=True, timeout=60)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("cfjax: interrupted"), p.stderr[-2000:]
    assert not out.exists()


SLOW_CLEANUP_COMMAND = """
import os, signal, sys, time
from pathlib import Path
import cfjax.cli as cli

def command(argv):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5.0)
    finally:  # clean-up that outlasts the 50 ms re-delivery period, e.g. removing a temporary file
        time.sleep(0.4)
        Path(sys.argv[1]).write_text("cleaned")
    return 0

cli._main = command
cli.main()
"""


def test_ctrl_c_lets_the_clean_up_of_the_interrupted_command_finish(tmp_path):
    """While a KeyboardInterrupt is being handled (its finally / except clean-up), no second one is
    raised into it: the clean-up completes, then the one line and exit 130."""
    marker = tmp_path / "cleaned.txt"
    p = subprocess.run([sys.executable, "-c", SLOW_CLEANUP_COMMAND, str(marker)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert marker.read_text() == "cleaned"
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cfjax: interrupted"), p.stderr[-2000:]
