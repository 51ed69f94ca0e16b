"""Shared benchmark machinery: device and version facts, interleaved A/B timing, peak memory,
result files (JSON + plot)."""

from __future__ import annotations

import argparse

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_threads() -> dict:
    """torch uses every core (as XLA:CPU does by default); returns what was set."""
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return {"torch_num_threads": torch.get_num_threads(), "torch_threads_note": "the twin then runs each setting with the faster of all cores and 1 thread (see rows[].twin_threads, benchmarks.common.pick_torch_threads)", "torch_interop_threads": torch.get_num_interop_threads(),
            "jax_threads": f"XLA:CPU default (all {cores} cores)"}


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        model = "unknown CPU"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        flags = ""
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    flags = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fl)
                    break
        except OSError:
            pass
        return {"kind": "cpu", "name": f"{model}, {os.cpu_count()} cores", "cpu_model": model, "cores": os.cpu_count(), "isa": flags}
    return {"kind": dev.platform, "name": dev.device_kind, "count": jax.device_count()}


def device_tag(info: dict) -> str:
    return "cpu" if info["kind"] == "cpu" else "gpu"


def versions() -> dict:
    import FrEIA
    import flax
    import jax
    import jaxlib
    import numpy
    import optax
    import torch

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__,
            "torch": torch.__version__, "FrEIA": getattr(FrEIA, "__version__", "0.2")}


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def stamp_end(result: dict) -> dict:
    """Record the load average and UTC time at the end of a run in ``result`` (returned)."""
    result["load_average_end"] = load_average()
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def ab_parser(name: str, doc: str, sizes: str, repeats: int) -> argparse.ArgumentParser:
    """The command line of a one-process A/B benchmark ``python -m benchmarks.<name>``: --sizes
    (comma-separated batches), --repeats and --out (default benchmarks/results/<name>_cpu.json);
    the description is the first line of ``doc``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.strip().splitlines()[0])
    p.add_argument("--sizes", default=sizes)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / f"{name}_cpu.json"))
    return p


def ab_result(name: str, argv, flags_added: list[str], settings: dict) -> dict:
    """The header of a one-process A/B benchmark's results (``python -m benchmarks.<name>``)."""
    return {"benchmark": name, "device": device_info(), "versions": versions(), "xla_flags_added": flags_added,
            "command": f"python -m benchmarks.{name} " + " ".join(argv or []), "load_average_start": load_average(),
            "settings": settings, "rows": []}


def save_ab(result: dict, path: str | Path) -> Path | None:
    """Stamp the end of an A/B run, write its JSON and print where."""
    out = save_json(stamp_end(result), path)
    print(f"-> {out}")
    return out


def timed(fn: Callable[[], object]) -> float:
    """Seconds for one call of ``fn`` (which must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved A B / B A / A B ... so drift cancels."""
    names = list(fns)
    out = {k: [] for k in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            out[k].append(timed(fns[k]))
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def _status(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
    except OSError:
        return None
    return None


def peak_rss_mb(fn: Callable[[], object]) -> float | None:
    """Extra resident memory (MB) at the high-water mark while ``fn`` runs: the kernel's peak-RSS
    counter is reset (``/proc/self/clear_refs`` = 5), then VmHWM - VmRSS-before. Host memory of
    the whole process, so it counts both JAX (XLA:CPU buffers are host memory) and torch tensors;
    None where /proc cannot be used. Freed heap pages are first returned to the system
    (``gc.collect`` + glibc ``malloc_trim``) so memory the allocators kept from earlier calls does
    not hide this call's working set."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status("VmRSS")
    fn()
    hwm = _status("VmHWM")
    if before is None or hwm is None:
        return None
    return round((hwm - before) / 1024.0, 1)


def jax_device_peak_mb() -> float | None:
    """JAX's own peak-bytes counter where the backend keeps one (GPU/TPU); None on CPU."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 1)


def save_json(result: dict, path: str | Path | None) -> Path | None:
    """Write ``result`` as indented JSON to ``path`` (atomically; parent folders created); None: no file."""
    if not path:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_result(result: dict, out_dir: Path | None = None, plot: Callable[[dict, Path], None] | None = None) -> Path:
    """Write ``<benchmark>_<device>.json`` (and the plot png next to it) atomically."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['benchmark']}_{result['device_tag']}"
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    if plot is not None:
        png = out_dir / f"{stem}.png"
        tmp_png = out_dir / f".{stem}.tmp.png"
        plot(result, tmp_png)
        os.replace(tmp_png, png)
        result["plot"] = str(png)
    return path


def plot_throughput(result: dict, path: Path, x_key: str, y_key: str, xlabel: str, ylabel: str) -> None:
    """Throughput of both sides against batch; with roofline columns, a second panel of achieved
    GFLOP/s against the ceilings measured in the same run (dashed: matmul, dotted: dominant conv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r.get("skipped")]
    extra = [r for r in (result.get("ibinn") or {}).get("rows", []) if not r.get("skipped")]
    roof = "roofline" in result and any("cfjax_gflop_s" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if roof else 1, figsize=(11 if roof else 6, 4))
    axes = list(axes) if roof else [axes]
    xs = [r[x_key] for r in rows]
    ax = axes[0]
    which = ", Glow flow" if extra else ""
    ax.plot(xs, [r[f"cfjax_{y_key}"] for r in rows], "o-", label=f"cfjax (JAX, jit){which}")
    ax.plot(xs, [r[f"twin_{y_key}"] for r in rows], "s--", label=f"PyTorch twin (eager){which}")
    if extra:
        ax.plot([r[x_key] for r in extra], [r[f"cfjax_{y_key}"] for r in extra], "^-", label="cfjax, IB-INN flow")
        if all(f"twin_{y_key}" in r for r in extra):
            ax.plot([r[x_key] for r in extra], [r[f"twin_{y_key}"] for r in extra], "v--", label="twin, IB-INN flow")
    ax.set_ylabel(ylabel)
    if roof:
        ax2 = axes[1]
        ax2.plot(xs, [r["cfjax_gflop_s"] for r in rows], "o-", color="C0", label=f"cfjax{which}")
        ax2.plot(xs, [r["twin_gflop_s"] for r in rows], "s--", color="C1", label=f"twin{which}")
        if extra and any("cfjax_gflop_s" in r for r in extra):
            ax2.plot([r[x_key] for r in extra], [r.get("cfjax_gflop_s") for r in extra], "^-", color="C2", label="cfjax, IB-INN flow")
            if all("twin_gflop_s" in r for r in extra):
                ax2.plot([r[x_key] for r in extra], [r["twin_gflop_s"] for r in extra], "v--", color="C3", label="twin, IB-INN flow")
        ceil = result["roofline"]["ceilings"]
        for side, color in (("cfjax", "C0"), ("twin", "C1")):
            m = ceil["matmul"].get(side)
            if isinstance(m, dict):
                ax2.axhline(m["gflop_s"], color=color, ls="--", lw=0.8, label=f"{side} matmul ceiling")
            c = (ceil.get("dominant_conv") or {}).get(side)
            if isinstance(c, dict):
                ax2.axhline(c["gflop_s"], color=color, ls=":", lw=1.2, label=f"{side} dominant-conv ceiling{which}")
        ax2.set_ylabel("achieved GFLOP/s (matmul + conv FLOPs)")
        ax2.legend(fontsize=7)
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel(xlabel)
        a.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['benchmark']} on {result['device']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def base_result(name: str, quick: bool) -> dict:
    info = device_info()
    return {
        "benchmark": name,
        "device": info,
        "device_tag": device_tag(info),
        "quick": quick,
        "command": " ".join(["python"] + sys.argv) if sys.argv and sys.argv[0] else "",
        "versions": versions(),
        "threads": setup_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_start": load_average(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


TWIN_DEVICE_ENV = "CFJAX_BENCH_TWIN_DEVICE"


def twin_device() -> str:
    """Where the twin is timed: $CFJAX_BENCH_TWIN_DEVICE, else "cuda" when JAX runs on a GPU and
    torch sees one, else "cpu". Parity is always checked on the CPU twin first."""
    import jax
    import torch

    dev = os.environ.get(TWIN_DEVICE_ENV, "").strip() or ("cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):  # float32 on both sides: no TF32 in torch (JAX: JAX_DEFAULT_MATMUL_PRECISION=highest, benchmarks/gpu.sh)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


def twin_context(dev: str):
    """torch's default device ``dev`` for everything the twin creates (a no-op for the CPU)."""
    import contextlib

    import torch

    return contextlib.nullcontext() if dev == "cpu" else torch.device(dev)


def on_twin_device(fn: Callable[[], object], dev: str) -> Callable[[], object]:
    """``fn`` run under :func:`twin_context` and, on a GPU, synchronised before it returns (so the
    timers see the finished work, as ``block_until_ready`` does for JAX)."""
    if dev == "cpu":
        return fn
    import torch

    def g():
        with torch.device(dev):
            out = fn()
        torch.cuda.synchronize()
        return out

    return g


def pick_torch_threads(fn: Callable[[], object], tries: int = 2) -> tuple[int, dict]:
    """Give the twin its best thread count for this setting: time ``fn`` with all cores and with
    one thread (min of ``tries`` calls each), keep the faster. On a machine whose cores are shared
    with other work, OpenMP's spin-waiting barriers can make every small torch op wait for a
    descheduled worker (measured here: 20x slower with 2 threads than 1 under load 6.5 on 2
    cores), so 'all cores' is not always the twin's best setting. Returns (threads, {n: s})."""
    import torch

    cores = os.cpu_count() or 1
    seen = {}
    torch.set_num_threads(1)
    fn()
    seen[1] = min(timed(fn) for _ in range(tries))
    if cores > 1:
        torch.set_num_threads(cores)
        t = timed(fn)  # first call at this count; far slower -> no point in more tries
        seen[cores] = t if t > 3 * seen[1] else min([t] + [timed(fn) for _ in range(tries)])
    best = min(seen, key=seen.get)
    torch.set_num_threads(best)
    return best, {str(k): v for k, v in seen.items()}


def budget_skip(prev: dict | None, batch: int, reps: int, budget_s: float, extra_calls: int = 5) -> dict | None:
    """A 'skipped' row when the previous row's times, scaled to ``batch``, predict more than
    ``budget_s`` seconds for this setting (``reps`` timed + ``extra_calls`` warm-up/trial calls)."""
    if prev is None:
        return None
    est = (prev["cfjax_s"] + prev["twin_s"]) * batch / prev["batch"] * (reps + extra_calls)
    if est <= budget_s:
        return None
    return {"batch": batch, "skipped": True, "reason": f"estimated {est:.0f}s > budget {budget_s:.0f}s on this device"}


def time_pair(batch: int, f_jax: Callable[[], object], f_torch: Callable[[], object], reps: int, work: float,
              unit: str, peak_memory: bool, extra_warmup: bool = False) -> dict:
    """One benchmark row: compile/first call of each side, the twin's thread choice, then
    ``reps`` A/B-interleaved timings. ``work`` units are done per call (``unit``: the throughput
    key suffix, e.g. ``cf_per_s``); ``speedup`` = twin median / cfjax median."""
    t_first_jax = timed(f_jax)  # compile + first run
    t_first_torch = timed(f_torch)
    threads, thread_trial = pick_torch_threads(f_torch)
    if extra_warmup:
        timed(f_jax), timed(f_torch)  # allocator and cache warm-up
    tm = interleaved({"cfjax": f_jax, "twin": f_torch}, reps)
    tj, tw = median(tm["cfjax"]), median(tm["twin"])
    row = {"batch": batch, "cfjax_s": tj, "twin_s": tw, f"cfjax_{unit}": work / tj, f"twin_{unit}": work / tw,
           "speedup": tw / tj, "cfjax_compile_s": max(t_first_jax - tj, 0.0), "twin_first_call_s": t_first_torch,
           "twin_threads": threads, "twin_thread_trial_s": thread_trial, "cfjax_times": tm["cfjax"], "twin_times": tm["twin"]}
    if peak_memory:
        row["cfjax_peak_rss_mb"] = peak_rss_mb(f_jax)
        row["twin_peak_rss_mb"] = peak_rss_mb(f_torch)
    return row


def set_headline(res: dict, rows: list[dict], head: int, target: float) -> None:
    """Record ``rows`` and the headline batch ``head``: speedup there and whether ``target`` is met."""
    res["rows"] = rows
    hr = next((r for r in rows if r["batch"] == head and not r.get("skipped")), None)
    res["headline"] = {"batch": head, "target_speedup": target}
    res["speedup"] = None if hr is None else hr["speedup"]
    res["target_met"] = None if hr is None else hr["speedup"] >= target
