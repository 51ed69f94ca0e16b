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
    "Machine: 2 cores shared with three other engineers' jobs; load average 6-10 throughout (load_average_start/end), "
    "so absolute throughputs are noisy. Ratios come from A/B-interleaved repeats in one process, so slow drift cancels; "
    "single settings still vary by tens of percent between runs.",
    "Twin threads: torch with 2 threads ran 20-100x slower than with 1 under this load (rows[].twin_thread_trial_s): "
    "OpenMP's spinning barriers wait for a worker whose core another process holds, on every one of the ~2,000 small ops "
    "of a call. Each row therefore times the twin at its faster setting (rows[].twin_threads, 1 everywhere here); "
    "cfjax runs with XLA's default pool over both cores.",
    "Memory (benchmarks/results/memory_cpu.json, peak extra host RSS of one call after freed heap is returned with "
    "malloc_trim): ECINN batch 256 cfjax 0.6 MB vs twin 34.9 MB; DISC batch 256 (5 steps) cfjax 1327 MB vs twin 617 MB; "
    "flow training batch 64 cfjax 95 MB vs twin 63 MB. The ECINN run's rows[].*_peak_rss_mb read 0 (measured before "
    "malloc_trim was added: allocator-cached pages hid the working set); the DISC and training rows agree with "
    "memory_cpu.json. Why cfjax's DISC peak is twice the twin's was not profiled; a candidate is the unrolled "
    "chunk (5 steps in one straight-line program, where a rolled loop reuses one step's buffers).",
    "Open finding, not profiled yet: cfjax's throughput falls at the largest batches in all three benchmarks "
    "(ECINN 167 cf/s at 16 -> 61 at 1024; training 381 img/s at 64 -> 130 at 256) more than the twin's does; "
    "the next thing to look at is XLA:CPU's conv tiling at large batch x small channel counts.",
    "Compile: cfjax_compile_s = first call minus steady-state median (XLA compilation per batch shape); the eager twin "
    "compiles nothing (twin_first_call_s includes its thread warm-up).",
]

NOTES = {
    "ecinn": [
        "Target (>= 3x at the headline batch 256) MISSED: 0.96x there; met only for small batches (4.7x at 1, 6.1x at 4), "
        "where the twin pays Python/dispatcher overhead per op (6 flow passes x 16 steps x ~20 ops) and XLA runs one fused "
        "executable. From batch 16 on the convolutions dominate and the ratio is 1.0-2.2x (1.75x at 1024).",
        "Profile (benchmarks/results/profile_ops_cpu.json, 1 thread, batch 256, the Glow coupling-subnet shapes): XLA:CPU's "
        "forward convolutions run at 3-28 GFLOP/s, oneDNN's at 9-92 GFLOP/s on the same shapes, 2.3-8x faster per conv "
        "(e.g. level-1 conv3 3x3 64->16 on 7x7: 18.2 ms vs 2.5 ms; level-0 1x1 32->32: 33 ms vs 3.9 ms). ECINN is forward "
        "passes only (encode, decode, 2 refinement rounds = 6 passes), so it runs exactly where XLA's small-channel convs "
        "are weakest; everything around them (ActNorm, 1x1 LU, Haar, clamp, latent step) is fused by XLA and cheap.",
        "Tried in cfjax, kept out: the subnet 1x1 conv as an einsum (XLA already lowers it to the same dot: bit-identical "
        "output, no measurable change); the refinement rounds unrolled instead of lax.fori_loop (1.708 s vs 1.705 s at "
        "batch 256: forward convs are not slowed by the loop, unlike gradients, see the DISC notes); im2col-by-shifts + "
        "matmul for the 3x3 convs (faster for the wide-output conv1 shapes, 5-30x slower for the narrow-output conv3 "
        "shapes, no net gain end to end); XLA_FLAGS --xla_cpu_use_onednn / --xla_cpu_use_xnnpack (no change beyond the "
        "load noise). bf16 on the AMX units would change the counterfactuals beyond the float32 tolerance and was not "
        "tried for the CPU result.",
    ],
    "disc": [
        "Profile-driven change in cfjax: the optimisation ran as one rolled lax.scan per stage; XLA:CPU runs the gradient "
        "of a convolution inside a while-loop body 4-5x slower than in straight-line code (benchmarks/results/"
        "profile_loop_cpu.json: 0.75 s vs 0.20 s per step, rolled_over_unrolled 3.8, same computation, batch 32). cfjax.methods.disc now runs each "
        "stage as a host loop over jitted chunks of UNROLL=10 fully unrolled steps (same function; tests/test_disc.py "
        "passes). A separate A/B on the shipped CNN, batch 32, gave 0.48 s -> 0.10 s per step for generate(); in the "
        "quick benchmark before the change cfjax was 0.26x the twin (batch 32, 3 steps).",
        "Target (>= 3x at batch 256) MISSED: 1.07x at 256, 0.7-1.37x over batches 1-64. Per step both sides run the "
        "same CNN forward + input gradient, which dominates the FLOPs; the op profile (profile_ops_cpu.json, 'disc "
        "conv*' rows) shows XLA and oneDNN equal on this CNN's forward convs (17-25 GFLOP/s each) and XLA 1.2-2.7x "
        "faster on forward + input gradient of single convs. End to end that advantage does not show up as 3x; where "
        "the rest of the step's time goes in XLA (the per-image BatchNorm statistics under vmap, the best-iterate "
        "bookkeeping) was not broken down in this session.",
    ],
    "train_flow": [
        "Target (>= 2x at batch 64) MISSED: 1.03x at 64; met at batch 16 (3.2x), 0.68x at 256. A training step is "
        "forward + backward of the Glow plus clip + AdamW/Adam. Per the op profile (profile_ops_cpu.json, 1 thread, "
        "batch 256) XLA:CPU is 1.6-2.1x faster than oneDNN on forward + input gradient of the level-0 subnet convs "
        "but 2.3-8x slower on the forward convs alone, which the training step also runs (and ECINN runs only).",
        "cfjax's train step does not donate its state buffers; donation is not used on CPU here (no device-memory "
        "pressure at 190k parameters).",
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
