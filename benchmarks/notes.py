"""Explanations attached to the committed CPU results (``notes`` in each results JSON).

Written after reading the runs and the profiles they cite; numbers quoted here come from the
results files named in each note. ``python -m benchmarks.notes`` (re)attaches them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

COMMON = [
    "Machine: 2 cores of an Intel Xeon (AVX-512), otherwise idle (load_average_start/end 0.7-1.9). Ratios come from "
    "A/B-interleaved repeats in one process, so slow drift cancels; the same command has given headline ratios that "
    "differ by about 10% between runs.",
    "Twin threads: each row times the twin at the faster of 1 thread and all cores (rows[].twin_threads; "
    "benchmarks.common.pick_torch_threads): on a loaded machine OpenMP's spinning barriers made 2 threads 20-100x "
    "slower than 1. cfjax runs with XLA's default pool over both cores.",
    "XLA flags (top-level xla_flags): cfjax.xla_cpu applies --xla_cpu_experimental_ynn_fusion_type=eltwise for ECINN and "
    "flow training, nothing for DISC; `cfjax bench all` runs each benchmark in its own process so each gets its own "
    "flags. What the flag is worth on its own: benchmarks/results/xla_cpu_flags_cpu.json (ECINN 1.61x, training 1.03x, "
    "DISC 0.84x, so DISC runs without it; two earlier runs: 1.42-1.65x, 1.06-1.08x, 0.84-0.87x).",
    "Compile: cfjax_compile_s = first call minus steady-state median (XLA compilation per batch shape, 3-8 s here); "
    "the eager twin compiles nothing.",
    "Memory: rows[].*_peak_rss_mb at the headline batch (extra host RSS high-water of one call, after malloc_trim): "
    "ECINN 193 vs 45 MB, DISC 317 vs 588 MB (1334 MB before max_pool_2x2), training 96 vs 62 MB (cfjax vs twin). "
    "benchmarks/results/memory_cpu.json holds an earlier, separate measurement (DISC then 1327 MB, before max_pool_2x2).",
]

NOTES = {
    "ecinn": [
        "Target (>= 3x at batch 256) MISSED: 1.13x at 256; met at batch 1 (3.17x) and about met at 4 (2.95x), 1.87x at "
        "1024. At small batches the twin pays Python/dispatcher cost per op (6 flow passes x 16 steps x ~20 ops per call) "
        "and cfjax runs one compiled program; from batch 64 on both spend their time in the same convolutions.",
        "Profile (benchmarks/results/profile_ops_cpu.json, idle machine, 1 thread, batch 256, the coupling-subnet "
        "shapes): XLA:CPU's convolutions (YNNPACK) and oneDNN's run at about the same speed: forward 0.6-1.7x, forward + "
        "input gradient 1.0-2.1x in XLA's favour. (An earlier profile taken on the loaded machine showed XLA 2-8x slower "
        "per forward conv; the idle re-run does not reproduce that, and that explanation is withdrawn.)",
        "What did cost cfjax time: XLA ran the bias add and ReLU between the subnet convolutions as separate passes over "
        "the (B, H, W, hidden) activations, memory-bound at these channel counts (a 3x3 2->32 conv at batch 256: 0.8 ms; "
        "the same conv + bias + ReLU: 2.0 ms). With --xla_cpu_experimental_ynn_fusion_type=eltwise a whole subnet compiles "
        "to one YNNPACK fusion and takes half the time; ECINN went from 0.67x (previous run) to 1.13x at batch 256.",
        "Why 3x is out of reach at batch 256 on this CPU: both sides now run comparable convolution kernels at comparable "
        "speed, and the twin's per-op overhead is small next to a batch-256 convolution. A 3x ratio there would need "
        "the twin to waste two thirds of its time, which it does only at batch 1-4.",
        "Tried, kept out: micro-batching a large batch through lax.map (chunks of 16-128: 0.8-1.0x at batch 256, a gain only at "
        "1024 without the flag); the subnet 1x1 conv as an einsum (same dot after XLA); the refinement rounds unrolled "
        "(no change); im2col + matmul for the 3x3 convs (slower for narrow outputs); --xla_cpu_use_onednn, "
        "--xla_cpu_use_xnnpack and XNN graph fusion (within 10%); YNN fusion of dot/reduce/convolution on top of eltwise "
        "(+4-9% on ECINN, slower on DISC). bf16 on the AMX units would change counterfactuals beyond the float32 tolerance.",
    ],
    "disc": [
        "Target (>= 3x at batch 256) MISSED: 1.04x at 256; 1.06x at 64, 1.28x at 1024, 0.81-1.04x at batches 1-16 "
        "(before the max-pool change below: 0.71x at 256, 0.75-0.84x everywhere).",
        "Profile-driven change in this run: a jax.profiler trace of a CNN forward + input gradient (batch 256) showed its "
        "convolutions running 2-20x slower inside the program than timed alone, and the process took tens of thousands "
        "of page faults per call: XLA:CPU allocates a program's temporaries afresh on every call (one 147 MB mmap per "
        "call in the trace), so every large intermediate is faulted in and zeroed again. The max-pool gradient was the "
        "biggest avoidable part: flax's nn.max_pool lowers to reduce-window, whose gradient XLA:CPU computes through "
        "select-and-scatter. cfjax.models.classifier.max_pool_2x2 (a choice among each window's four strided slices; "
        "the same values and gradients as nn.max_pool, ties included: the gradient goes to the first maximal element, "
        "as in select-and-scatter and torch; tests/test_classifier.py) replaces it in the CNN and in DUQ. On the shipped "
        "CNN's forward + input gradient at batch 256: 76,933 -> 23,129 page faults per call. disc.generate at batch "
        "256, 25 steps: 9.5 s -> 6.6 s.",
        "Forcing glibc to keep the freed temporaries (one arena, no mmap, no trim; set with mallopt before JAX starts) "
        "cut the page faults to ~3,000 a call but made disc.generate only 6% faster on top of the max-pool change, and "
        "made it 18% slower without it; not adopted.",
        "Remaining profile at batch 256: the classifier's forward + input gradient is ~3/4 of a step; the per-image "
        "BatchNorm statistics term ~1/5; the optimisation loop adds nothing measurable (CE-only generate = bare forward "
        "+ gradient). Per op, XLA's convolutions match oneDNN's (profile_ops_cpu.json 'disc conv*' rows). So 3x is out "
        "of reach here for the same reason as ECINN: both sides spend a batch-256 step in comparable kernels.",
        "Earlier profile-driven change, kept: the optimisation runs as jitted chunks of unrolled steps, not one rolled "
        "lax.scan (XLA:CPU runs convolution gradients inside a while loop 4-5x slower; profile_loop_cpu.json).",
        "The eltwise YNN fusion flag does not help DISC (xla_cpu_flags_cpu.json), so cfjax does not apply it here.",
    ],
    "train_flow": [
        "Target (>= 2x at batch 64) MISSED: 1.08x at 64; 1.78x at batch 16, 0.84x at 256. A step is forward + backward of "
        "the Glow plus clipping and Adam; as for ECINN, the convolutions run at parity per op, and the eltwise YNN flag "
        "gives training only 1.08x (its backward passes are dominated by the gradient convolutions, not by the "
        "elementwise passes).",
        "cfjax's train step does not donate its state buffers (190k parameters; no device-memory pressure on CPU).",
    ],
}


def attach(path: str | os.PathLike) -> None:
    """Add COMMON + NOTES[benchmark] as ``notes`` to a results JSON (atomically)."""
    path = Path(path)
    res = json.loads(path.read_text())
    res["notes"] = NOTES.get(res["benchmark"], []) + COMMON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    for p in sys.argv[1:] or sorted(Path(__file__).parent.joinpath("results").glob("*_cpu.json")):
        if json.loads(Path(p).read_text()).get("benchmark") in NOTES:
            attach(p)
            print(f"notes -> {p}")
