"""Ctrl-C at any moment of a command: one line, exit 130, no output or temporary file left, and
no crash in interpreter teardown (which XLA's threads can cause)."""

import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("after", [0.1, 0.5, 1.5, 3.0, 8.0])  # during start-up, loading/compiling, computing
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, after):
    out = tmp_path / "cf.npz"
    p = subprocess.Popen([sys.executable, "-m", "cfjax.cli", "explain", "ecinn", "--limit", "2000", "--quiet",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert p.returncode == 130, (p.returncode, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("cfjax: interrupted"), stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
