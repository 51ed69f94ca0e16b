"""Cost growth of sharded explain runs: time per image and peak memory against the number of queries.

    python -m benchmarks.cost_growth [--method ecinn|disc] [--sizes 1024 10240] [--out benchmarks/results/cost_growth_ecinn_cpu.json]

Each size N runs ``cfjax explain <method> --shards`` over N images in a fresh process (the
command line itself, streaming shard by shard), on a file of 28x28 digits made by repeating the
5,000 embedded mnist5k images (any 28x28 images serve; the cost does not depend on which).
Reported per N: wall time of the process, the generation time the manifest records (sum over
shards), the same without the first shard (which includes compilation), time per image from
that steady part, and the process's peak resident memory (``ru_maxrss``). Time per image should
stay constant and memory flat as N grows: no result is kept after its shard is written.

Settings: ECINN with the command's defaults on the shipped IB-INN flow (``--batch-size 256
--shard-size 256``); DISC with the cheap benchmark configuration (pixels prior, no manifold
model, one stage of ``--steps`` steps; ``--batch-size 128 --shard-size 128``). Shards of one
batch each, so that even the smallest N has shards after the first (the steady part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

RUNNER = ("import resource, sys, time; from cfjax.cli import main; t0 = time.perf_counter(); rc = main(sys.argv[1:]); "
          "print('COST', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(rc)")


def make_images(n: int, path: Path) -> Path:
    from cfjax.data import load_dataset

    base = load_dataset("mnist5k", "all").images
    x = (np.resize(base, (n, *base.shape[1:])) * 255).round().astype(np.uint8)
    np.savez(path, x=x, y=np.zeros(n, np.int64))
    return path


def command(method: str, data: Path, out: Path, steps: int) -> list[str]:
    if method == "ecinn":
        return ["explain", "ecinn", "--data", str(data), "--model", "mnist5k", "--limit", "all", "--shards", "--shard-size", "256",
                "--batch-size", "256", "--out", str(out), "--quiet"]
    return ["explain", "disc", "--data", str(data), "--model", "mnist5k", "--limit", "all", "--shards", "--shard-size", "128",
            "--batch-size", "128", "--steps", str(steps), "--prior", "pixels", "--manifold", "none", "--no-progressive",
            "--out", str(out), "--quiet"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cost_growth", description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("ecinn", "disc"), default="ecinn")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of queries (default ecinn: 1024 10240; disc: 256 1024)")
    ap.add_argument("--steps", type=int, default=25, help="DISC optimisation steps (default 25)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/cost_growth_<method>_<device>.json)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = args.sizes or ([1024, 10240] if args.method == "ecinn" else [256, 1024])
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    rows = []
    with tempfile.TemporaryDirectory(prefix="cfjax-cost-") as tmp:
        tmp = Path(tmp)
        data = make_images(max(sizes), tmp / "digits.npz")
        for n in sizes:
            part = make_images(n, tmp / f"digits_{n}.npz") if n != max(sizes) else data
            out = tmp / f"run_{n}"
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", RUNNER, *command(args.method, part, out, args.steps)], env=env,
                               capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"N={n} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            line = next(ln for ln in p.stdout.splitlines() if ln.startswith("COST "))
            _, cli_s, maxrss_kb = line.split()
            m = json.loads((out / "manifest.json").read_text())
            shard_s = [e["seconds"] for e in m["shards"]]
            steady = shard_s[1:] if len(shard_s) > 1 else shard_s
            steady_n = sum(e["n"] for e in m["shards"][1:]) if len(shard_s) > 1 else m["shards"][0]["n"]
            row = {"n": n, "shards": len(shard_s), "process_wall_s": round(wall, 2), "cli_s": round(float(cli_s), 2),
                   "generation_s": round(sum(shard_s), 3), "first_shard_s": shard_s[0],
                   "steady_s_per_image": sum(steady) / steady_n, "peak_rss_mb": round(int(maxrss_kb) / 1024, 1),
                   "shard_seconds": shard_s}
            key = "validity" if args.method == "ecinn" else "flip_rate"
            row[key] = sum(e.get(key, 0) * e["n"] for e in m["shards"]) / n
            rows.append(row)
            print(f"{args.method} N={n}: {row['steady_s_per_image'] * 1000:.2f} ms/image (steady), first shard {shard_s[0]:.1f}s, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB, process {wall:.0f}s", flush=True)
    base = rows[0]
    for r in rows:
        r["s_per_image_vs_smallest"] = r["steady_s_per_image"] / base["steady_s_per_image"]
        r["peak_rss_vs_smallest"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    import jax

    dev = jax.devices()[0]
    tag = "cpu" if dev.platform == "cpu" else "gpu"
    result = {"benchmark": f"cost_growth_{args.method}", "device": {"platform": dev.platform, "kind": dev.device_kind, "cores": os.cpu_count()},
              "command": "python -m benchmarks.cost_growth " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cli": "cfjax " + " ".join(command(args.method, Path("DIGITS.npz"), Path("OUT"), args.steps)),
              "load_average_end": [round(v, 2) for v in os.getloadavg()], "rows": rows,
              "notes": "steady_s_per_image excludes the first shard (compilation); peak_rss_mb is the whole process's high-water mark."}
    out = Path(args.out or repo / "benchmarks" / "results" / f"cost_growth_{args.method}_{tag}.json")
    common.save_json(result, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
