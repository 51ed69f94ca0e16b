"""ECINN counterfactuals/s at a fixed global batch on 1, 2, 4, 8 devices (the batch Mesh).

    python -m benchmarks.scaling [--batch 256] [--devices 1 2 4 8] [--repeats 7] [--model mnist5k] [--out benchmarks/results/scaling_cpu.json]

Without a GPU/TPU the devices are forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before jax is imported): they
share the machine's real cores, so on a small CPU this measures the *overhead* of sharding (the
partitioned program, the scatter of the batch and the gather of the results), not a speedup.
On real accelerators the same script measures scaling.

Method: a shipped flow (``--model``, default the CLI's IB-INN flow ``mnist5k``; ``mnist5k_glow``
the Glow flow) with the CLI's ECINN defaults (step rule, refinement rounds, target "next") and the
XLA:CPU flags cfjax sets for ECINN (``cfjax.xla_cpu``); per device count, compile time is ``lower().compile()`` of the sharded program,
reported separately; then warm-up calls and ``repeats`` timed calls with ``block_until_ready``,
interleaved over the device counts (round-robin, so machine drift spreads over all of them);
the median is reported with min and max. Every device count's counterfactuals are compared to
the 1-device ones (max abs difference).
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from cfjax import xla_cpu  # noqa: E402 - before JAX starts its backend

xla_cpu.apply("ecinn")  # the flags `cfjax explain ecinn` runs with (the device count above wins)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def cpu_description() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or "unknown", "cpu_count": os.cpu_count(),
            "usable_cores": xla_cpu.usable_cores()}


def versions() -> dict:
    import flax
    import jax
    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="global batch (queries per call), divisible by every device count")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="mnist5k", help="shipped flow: mnist5k (IB-INN, the CLI's default) or mnist5k_glow")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/scaling_cpu.json")
    ap.add_argument("--png", default=None, help="plot (default: --out with .png)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import jax

    from cfjax.data import load_dataset
    from cfjax.pipelines.explain_ecinn import DEFAULT_REFINE, DEFAULT_STEP, _explain_batch
    from cfjax.pipelines.sharding import batch_mesh, replicate, shard_batch
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    for d in args.devices:
        if args.batch % d:
            raise SystemExit(f"--batch {args.batch} is not divisible by {d} devices")
    params0, config, _ = load_flow(default_model_dir("flow", args.model))
    test = load_dataset("mnist5k", "test").images
    x = np.resize(test, (args.batch,) + test.shape[1:]).astype(np.float32)  # repeats the split if the batch is larger
    tk = np.zeros(args.batch, np.int32)
    static = dict(step=DEFAULT_STEP, direction="predicted_means", refine=DEFAULT_REFINE)

    setups, rows, ref = {}, {}, None
    for d in args.devices:
        mesh = batch_mesh(d)
        p, xs, ts = replicate(params0, mesh), shard_batch(x, mesh), shard_batch(tk, mesh)
        t0 = time.perf_counter()
        compiled = _explain_batch.lower(p, config, xs, True, ts, mesh=mesh, **static).compile()
        compile_s = time.perf_counter() - t0
        run = lambda p=p, xs=xs, ts=ts, c=compiled: jax.block_until_ready(c(p, xs, True, ts))  # noqa: E731
        out = run()
        x_cf = np.asarray(out["x_cf"])
        if ref is None:
            ref = x_cf
        for _ in range(args.warmup):
            run()
        setups[d] = run
        rows[d] = {"devices": d, "global_batch": args.batch, "per_device_batch": args.batch // d,
                   "compile_s": round(compile_s, 3), "max_abs_diff_x_cf_vs_1_device": float(np.abs(x_cf - ref).max()),
                   "validity": float(np.mean(np.asarray(out["y_cf_pred"]) == np.asarray(out["y_target"]))), "times": []}
        print(f"{d} device(s): compiled in {compile_s:.1f}s", flush=True)
    for r in range(args.repeats):  # interleaved: drift spreads over every device count
        for d in args.devices:
            t0 = time.perf_counter()
            setups[d]()
            rows[d]["times"].append(time.perf_counter() - t0)
    base = None
    out_rows = []
    for d in args.devices:
        row = rows[d]
        ts = row.pop("times")
        med = statistics.median(ts)
        row.update(median_s=round(med, 5), min_s=round(min(ts), 5), max_s=round(max(ts), 5),
                   cf_per_s=round(args.batch / med, 2))
        base = base or row["cf_per_s"]
        row["relative_to_1_device"] = round(row["cf_per_s"] / base, 3)
        out_rows.append(row)
        print(f"{d} device(s): median {med * 1000:.1f} ms / batch of {args.batch} -> {row['cf_per_s']:.0f} cf/s "
              f"({row['relative_to_1_device']:.2f}x of 1 device), compile {row['compile_s']:.1f}s", flush=True)

    dev = jax.devices()[0]
    forced = dev.platform == "cpu"
    result = {
        "benchmark": "scaling",
        "device": {**cpu_description(), "jax_platform": dev.platform, "jax_device_kind": getattr(dev, "device_kind", ""),
                   "local_devices": jax.local_device_count(), "forced_host_devices": forced},
        "versions": versions(),
        "settings": {"method": "ecinn", "model": f"{args.model} (shipped flow)", "global_batch": args.batch, "target": "next",
                     **static, "repeats": args.repeats, "warmup": args.warmup, "timing": "median of interleaved repeats, block_until_ready",
                     "xla_flags": os.environ.get("XLA_FLAGS", ""), "command": "python -m benchmarks.scaling " + " ".join(argv or sys.argv[1:])},
        "rows": out_rows,
        "notes": (
            "Forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count) all share the same "
            f"{cpu_description()['usable_cores']} real CPU core(s), so this is not a scaling measurement: with more "
            "devices than cores it measures the overhead of sharding the batch (partitioned program, scatter/gather, "
            "devices time-sharing the cores); with up to as many devices as cores a gain can appear because XLA runs "
            "the per-device programs concurrently on cores that a single device's program leaves partly idle. "
            "Speedup from more devices needs real devices (GPUs/TPUs); run the same script there. The machine was "
            "shared with other jobs while measuring: see min_s/max_s for the spread."
            if forced else "Real accelerator devices: relative_to_1_device is the measured scaling."
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"-> {out}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(args.png) if args.png else out.with_suffix(".png")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ds = [r["devices"] for r in out_rows]
    a1.plot(ds, [r["cf_per_s"] for r in out_rows], "o-", label="measured")
    a1.plot(ds, [base * d for d in ds], "--", color="grey", label="ideal linear scaling")
    a1.set_xscale("log", base=2)
    a1.set_xticks(ds, [str(d) for d in ds])
    a1.set_xlabel("devices" + (" (forced host devices)" if forced else ""))
    a1.set_ylabel("ECINN counterfactuals / s")
    a1.set_title(f"global batch {args.batch}")
    a1.legend(fontsize=8)
    a2.bar([str(d) for d in ds], [r["compile_s"] for r in out_rows])
    a2.set_xlabel("devices")
    a2.set_ylabel("compile time (s)")
    fig.suptitle(f"{result['device']['cpu_model']} ({result['device']['usable_cores']} cores)" if forced else dev.device_kind, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"-> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
