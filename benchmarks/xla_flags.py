"""A/B of the XLA:CPU flags cfjax applies per workload (cfjax.xla_cpu), each setting in a fresh process.

    python -m benchmarks.xla_flags [--rounds 3] [--out benchmarks/results/xla_cpu_flags_cpu.json]

XLA reads its flags once per process, so every measurement is its own subprocess: for each
workload and round, one process with ``CFJAX_XLA_DEFAULTS=0`` (plain XLA) and one with the
candidate flags, in alternating order so that drift cancels. Each process times its workload at
the headline batch (median of repeats after a warm-up call) and saves its output, so the JSON
also holds the largest difference the flags make to the results.

Workloads (the same functions the cfjax-vs-twin benchmarks time):
  ecinn       encode + counterfactual_from_latent on the Glow flow (mnist5k_glow), step "short", batch 256
  ecinn_ibinn the same on the shipped IB-INN flow (the CLI's default model) with the CLI's settings
  train_flow  one IB-INN training step (jit), batch 64
  disc        disc.generate, the benchmark configuration with 5 Adam steps, batch 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKLOADS = ("ecinn", "ecinn_ibinn", "train_flow", "disc")
# the cfjax.xla_cpu workload whose flags each benchmark workload gets (ECINN's, whatever the flow)
CFJAX_WORKLOAD = {"ecinn_ibinn": "ecinn"}
CANDIDATE = "--xla_cpu_experimental_ynn_fusion_type=eltwise"
REPO = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (compiles)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def worker(workload: str, out: str, repeats: int) -> None:
    """Time ``workload`` in this process and save {median_s, times, output} to ``out`` (npz)."""
    import jax
    import jax.numpy as jnp

    if workload in ("ecinn", "ecinn_ibinn"):
        from benchmarks import bench_ecinn as b

        ibinn = workload == "ecinn_ibinn"
        params, config, _, images, _ = b.load(b.IBINN_MODEL if ibinn else b.GLOW_MODEL)
        step, refine = b.cli_settings() if ibinn else (b.STEP, b.REFINE)
        cf = b.cfjax_fn(config, step, b.DIRECTION, refine)
        x = jnp.asarray(np.resize(images, (256, *images.shape[1:])).astype(np.float32))
        holder = {}

        def fn():
            holder["out"] = jax.block_until_ready(cf(params, x))["x_cf"]
    elif workload == "train_flow":
        from benchmarks import bench_train_flow as b

        params, config, train, _ = b.load()
        step, opt = b._cfjax_step(config, train, b.TOTAL_STEPS)
        x, y = train.images[:64], train.labels[:64]
        holder = {"state": {"params": params, "opt_state": opt.init(params)}, "step": 0}

        def fn():
            key = jax.random.fold_in(jax.random.PRNGKey(0), holder["step"])
            holder["state"], m = step(holder["state"], x, y, key)
            holder["step"] += 1
            holder["out"] = jax.block_until_ready(m["loss"])
    elif workload == "disc":
        from benchmarks import bench_disc as b
        from benchmarks.twins import disc as tdisc
        from cfjax.methods import disc

        apply_fn, variables, _, _, images, _ = b.load()
        x = np.resize(images, (256, *images.shape[1:])).astype(np.float32)
        t = b._targets(apply_fn, variables, jnp.asarray(x))
        cfg = tdisc.bench_config(5)
        holder = {}

        def fn():
            holder["out"] = jax.block_until_ready(disc.generate(apply_fn, variables, x, t, cfg, apply_kwargs={"train": False}))["x_cf"]
    else:
        raise SystemExit(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    med, ts = _time(fn, repeats)
    if workload == "train_flow":  # compare a fresh first step's loss, not the state after many steps
        holder["state"], holder["step"] = {"params": params, "opt_state": opt.init(params)}, 0
        fn()
    np.savez(out, median_s=med, times=np.asarray(ts), output=np.asarray(holder["out"]), xla_flags=os.environ.get("XLA_FLAGS", ""))


def _one(workload: str, flags_on: bool, repeats: int, tmp: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = " ".join([t for t in env.get("XLA_FLAGS", "").split() if not t.startswith(CANDIDATE.split("=")[0])] + ([CANDIDATE] if flags_on else []))
    env["CFJAX_XLA_DEFAULTS"] = "0"  # exactly the flags above, nothing added by cfjax
    out = os.path.join(tmp, f"{workload}_{int(flags_on)}_{time.monotonic_ns()}.npz")
    subprocess.run([sys.executable, "-m", "benchmarks.xla_flags", "--worker", workload, "--worker-out", out, "--repeats", str(repeats)], env=env, check=True)
    with np.load(out) as z:
        return {"median_s": float(z["median_s"]), "times": z["times"].tolist(), "output": z["output"], "xla_flags": str(z["xla_flags"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.xla_flags", description=__doc__.strip().splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per workload (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (default 5)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "xla_cpu_flags_cpu.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.worker_out, a.repeats)
        return 0
    from benchmarks import common
    from cfjax import xla_cpu

    res = {"benchmark": "xla_cpu_flags", "device": common.device_info(), "versions": common.versions(), "candidate": CANDIDATE,
           "command": "python -m benchmarks.xla_flags " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_average_start": common.load_average(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for w in a.workloads.split(","):
            off, on = [], []
            outs = {}
            for r in range(a.rounds):
                for flags_on in ((False, True) if r % 2 == 0 else (True, False)):
                    m = _one(w, flags_on, a.repeats, tmp)
                    (on if flags_on else off).append(m["median_s"])
                    outs.setdefault(flags_on, m["output"])
            d = np.abs(outs[True].astype(np.float64) - outs[False].astype(np.float64))
            diff, p999 = float(d.max()), float(np.percentile(d, 99.9))
            row = {"workload": w, "plain_s": off, "flags_s": on, "plain_median_s": float(np.median(off)), "flags_median_s": float(np.median(on)),
                   "speedup": float(np.median(off) / np.median(on)), "max_abs_output_difference": diff, "p99_9_abs_output_difference": p999,
                   "cfjax_applies": list(xla_cpu.flags_for(CFJAX_WORKLOAD.get(w, w)))}
            res["rows"].append(row)
            print(f"{w}: plain {row['plain_median_s']:.3f} s, with {CANDIDATE} {row['flags_median_s']:.3f} s -> {row['speedup']:.2f}x; max |difference| {diff:.2e}; cfjax applies: {row['cfjax_applies'] or 'none'}")
    res["load_average_end"] = common.load_average()
    res["notes"] = ("Outputs compared: ecinn and ecinn_ibinn x_cf (256, 28, 28, 1), train_flow the loss of a first step, disc x_cf after 5 steps "
                    "(256, 28, 28, 1). The flag changes how XLA fuses and so the float32 rounding; max and 99.9th percentile of "
                    "|difference| are given per workload.")
    common.save_json(res, a.out)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
