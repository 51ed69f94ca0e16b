"""Multi-host for real: two local processes joined by ``jax.distributed`` (CPU, gloo collectives,
a loopback coordinator) run one sharded ECINN explain and one sharded DISC explain through the
command line's ``--distributed`` path, into one shared shard directory each, and the arrays equal
a single-process run of the same command byte for byte.

Each command runs in fresh processes (``jax.distributed.initialize`` must come before JAX's first
computation and happens once per process). The two processes of a pair start at the same moment,
so the shard directory's creation by one while the other joins it is exercised too.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cfjax.pipelines import shards as sh
from test_shards import shard_arrays  # noqa: E402 - one copy of the helper, in the shard tests

# 12 queries in shards of 4 (3 shards: process 0 takes 0 and 2, process 1 takes 1); batch 4.
ECINN = ["explain", "ecinn", "--limit", "12", "--shards", "--shard-size", "4", "--batch-size", "4", "--quiet"]
DISC = ["explain", "disc", "--limit", "12", "--shards", "--shard-size", "4", "--batch-size", "4", "--steps", "3",
        "--prior", "pixels", "--manifold", "none", "--no-progressive", "--quiet"]
# The command line in a fresh interpreter, then what jax itself reports about the process group.
RUNNER = ("import sys, jax; from cfjax.cli import main; rc = main(sys.argv[1:]); "
          "print(f'jax processes: {jax.process_index()} of {jax.process_count()}', flush=True); sys.exit(rc)")
TIMEOUT_S = 900  # 2 shared cores: six fresh interpreters, each compiling its program


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, tmp_path, name):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one process = one CPU device, whatever the test session forced
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path), log


def wait_all(procs, tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    for name, (p, log) in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                q.kill()
            pytest.fail(f"{name} did not finish in {TIMEOUT_S}s:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
        finally:
            log.close()
    out = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    for name, (p, _) in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[name][-3000:]}"
    return out


@pytest.mark.slow
def test_two_jax_distributed_processes_equal_one_process(tmp_path):
    procs = {}
    for method, argv in (("ecinn", ECINN), ("disc", DISC)):
        procs[f"{method}_single"] = launch([*argv, "--out", str(tmp_path / f"{method}_single")], tmp_path, f"{method}_single")
        port = free_port()
        for i in (0, 1):
            procs[f"{method}_p{i}"] = launch(
                [*argv, "--out", str(tmp_path / f"{method}_pod"), "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                 "--process-count", "2", "--process-index", str(i)], tmp_path, f"{method}_p{i}")
    logs = wait_all(procs, tmp_path)
    for method in ("ecinn", "disc"):
        assert "jax processes: 0 of 1" in logs[f"{method}_single"]
        for i in (0, 1):
            assert f"jax processes: {i} of 2" in logs[f"{method}_p{i}"], logs[f"{method}_p{i}"]
        pod, single = tmp_path / f"{method}_pod", tmp_path / f"{method}_single"
        manifests = sorted(p.name for p in pod.glob("manifest*"))
        assert manifests == ["manifest-p00000-of-00002.json", "manifest-p00001-of-00002.json"]
        for i, name in enumerate(manifests):
            m = json.loads((pod / name).read_text())
            assert m["completed"] and m["process_index"] == i and m["assigned"] == [k for k in range(3) if k % 2 == i]
        assert sh.open_shards(pod).complete
        a, b = shard_arrays(pod), shard_arrays(single)
        assert sorted(a) == sorted(b) == [sh.shard_name(k) for k in range(3)]
        assert a == b, method
        assert np.array_equal(sh.load_shards(pod)["x_cf"], sh.load_shards(single)["x_cf"])


def test_distributed_needs_a_shard_directory(tmp_path, capsys):
    from cfjax.cli import main

    assert main([*ECINN[:2], "--limit", "2", "--out", str(tmp_path / "cf.npz"), "--distributed"]) == 2
    assert "--distributed processes share a shard directory" in capsys.readouterr().err
    assert main([*ECINN, "--out", str(tmp_path / "d"), "--coordinator-address", "127.0.0.1:1"]) == 2
    assert "--coordinator-address is for --distributed runs" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "cf.npz").exists()


def test_processes_of_one_run_join_a_directory_but_never_overwrite(tmp_path):
    from cfjax.errors import CfjaxError

    header = {"method": "ecinn", "settings": {"batch_size": 4}}
    d = tmp_path / "pod"
    r1 = sh.open_run(d, header, 12, 4, False, 1, 2, log=lambda s: None)  # process 1 first
    assert r1.manifest_path.exists()
    r0 = sh.open_run(d, header, 12, 4, False, 0, 2, log=lambda s: None)  # process 0 joins, no --resume needed
    assert r0.mine == [0, 2]
    with pytest.raises(CfjaxError, match="already holds this process's manifest-p00000"):
        sh.open_run(d, header, 12, 4, False, 0, 2, log=lambda s: None)
    with pytest.raises(CfjaxError, match="other settings"):
        sh.open_run(tmp_path / "pod2", header, 12, 4, False, 1, 2, log=lambda s: None)
        sh.open_run(tmp_path / "pod2", {**header, "settings": {"batch_size": 8}}, 12, 4, False, 0, 2, log=lambda s: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CfjaxError, match="notes.txt"):
        sh.open_run(other, header, 12, 4, False, 0, 2, log=lambda s: None)
    single = tmp_path / "single"
    sh.open_run(single, header, 12, 4, False, 0, 1, log=lambda s: None)
    with pytest.raises(CfjaxError, match="written by 1 process"):
        sh.open_run(single, header, 12, 4, False, 0, 2, log=lambda s: None)
