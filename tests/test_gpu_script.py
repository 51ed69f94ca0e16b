"""benchmarks/gpu.sh, checked without a GPU: its syntax, what a dry run would run (every benchmark,
offline installs only, flags each benchmark's own parser accepts, results under $OUT), and (slow)
a real run at tiny sizes on the CPU."""

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(tmp_path, **env):
    e = dict(os.environ, OUT=str(tmp_path / "out"), **env)
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr + p.stdout
    return [shlex.split(line[len("RUN: "):]) for line in p.stdout.splitlines() if line.startswith("RUN: ")]


def python_module_calls(cmds):
    """(module, argv) of every `python -m MODULE ...` the script runs (through `timeout S` or not)."""
    out = []
    for c in cmds:
        if c and c[0] == "timeout":
            c = c[2:]
        if len(c) > 2 and c[1] == "-m" and c[2] != "pip":
            out.append((c[2], c[3:]))
    return out


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    h = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--dry-run" in h.stdout
    assert subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True).returncode == 2


def test_dry_run_names_every_benchmark_with_flags_its_parser_accepts(tmp_path):
    import argparse

    from benchmarks import run as bench_run
    from benchmarks import scaling

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "freia-0.2-py3-none-any.whl").write_bytes(b"")
    cmds = dry_run(tmp_path, CFJAX_WHEELS=str(wheels), CFJAX_GPU_NDEV="2")
    pips = [c for c in cmds if c[1:4] == ["-m", "pip", "install"]]
    assert len(pips) == 2 and all("--no-index" in c and "--no-deps" in c for c in pips)  # offline, nothing resolved
    assert str(wheels / "freia-0.2-py3-none-any.whl") in pips[0] and pips[1][-2:] == ["-e", "."]

    calls = python_module_calls(cmds)
    names = []
    for module, argv in calls:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        if module == "benchmarks.run":
            p = argparse.ArgumentParser(exit_on_error=False)
            bench_run.add_arguments(p)
            args = p.parse_args(argv)  # SystemExit on a flag it does not know
            names.append(args.which)
            assert Path(args.out_dir) == tmp_path / "out" and args.sizes and args.repeats
        else:
            assert module == "benchmarks.scaling"
            args = scaling.build_parser().parse_args(argv)
            assert args.devices == [1, 2] and Path(args.out) == tmp_path / "out" / "scaling_gpu.json"
            names.append("scaling")
    assert names == [*bench_run.NAMES, "scaling"]
    assert all(c[0] == "timeout" and 0 < int(c[1]) <= 480 for c in cmds if c and c[0] == "timeout")
    assert not (tmp_path / "out" / "gpu_log.txt").exists()  # a dry run writes no log


def test_one_gpu_runs_no_scaling_and_sizes_can_be_set(tmp_path):
    cmds = dry_run(tmp_path, ECINN_SIZES="2,4", REPEATS="1", CFJAX_GPU_BUDGET_S="100")
    calls = python_module_calls(cmds)
    assert [m for m, _ in calls] == ["benchmarks.run"] * 3
    ecinn = next(a for m, a in calls if a[0] == "ecinn")
    assert ecinn[ecinn.index("--sizes") + 1] == "2,4" and ecinn[ecinn.index("--repeats") + 1] == "1"
    assert all(int(c[1]) <= 100 for c in cmds if c[0] == "timeout")


@pytest.mark.slow
def test_tiny_real_run_on_the_cpu(tmp_path):
    """The whole script at tiny sizes with --allow-cpu (results are *_cpu.json there): installs
    from the repository without network, every benchmark passes parity and writes roofline columns."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), ECINN_SIZES="2", DISC_SIZES="2", TRAIN_SIZES="4", REPEATS="1",
               CFJAX_GPU_BUDGET_S="1500", CFJAX_GPU_NO_INSTALL="1", PYTHON=shutil.which("python") or "python3", CFJAX_WHEELS=str(tmp_path / "none"))
    p = subprocess.run(["bash", str(SCRIPT), "--allow-cpu"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "gpu_log.txt").is_file()
    for name in ("ecinn", "disc", "train_flow"):
        r = json.loads((out / f"{name}_cpu.json").read_text())
        assert "roofline" in r and r["rows"][0]["flops_per_item"] > 0 and r["twin_device"] == "cpu"
