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
