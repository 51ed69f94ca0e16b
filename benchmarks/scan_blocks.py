"""A/B of scanning the IB-INN flow's blocks in eval mode against unrolling them, in one process.

    python -m benchmarks.scan_blocks [--sizes 16,256] [--repeats 5] [--out benchmarks/results/scan_blocks_cpu.json]

Two parts. (1) Compile time of one encode and one decode (batch 64) of the authors' 24 + 24-block
network (random weights), each resolution's blocks as one ``lax.scan`` (what cfjax runs,
``cfjax.models.ibinn.SCAN_BLOCKS``) or unrolled (the code before the scan). (2) ECINN with the
CLI's defaults on the shipped IB-INN flow (``mnist5k_flow``), next-class targets: the first call
(compile + run) and the steady throughput, timed interleaved. The XLA flags are cfjax's for ECINN
(set before JAX starts). Outputs of the two programs are compared.
"""

from __future__ import annotations

import time

import numpy as np

def main(argv=None) -> int:
    from benchmarks import common

    a = common.ab_parser("scan_blocks", __doc__, "16,256", 5).parse_args(argv)
    from cfjax import xla_cpu

    flags = xla_cpu.apply("ecinn")
    import jax
    import jax.numpy as jnp

    from benchmarks import bench_ecinn
    from cfjax.models import ibinn

    res = common.ab_result("scan_blocks", argv, flags, {"model": "cfjax/pretrained/mnist5k_flow", "target": "next", "repeats": a.repeats})

    # (1) compile time of the full-depth network
    full = ibinn.IBINNConfig(blocks_high=24, blocks_low=24)
    fp = ibinn.init_ibinn(jax.random.PRNGKey(0), full)
    x64 = jax.random.uniform(jax.random.PRNGKey(1), (64, *full.image_shape))
    compiled = {}
    for scan in (False, True):
        ibinn.SCAN_BLOCKS = scan
        try:  # fresh functions: jit traces once per function, and the flag is read when tracing
            enc = jax.jit(lambda q, v: ibinn.ibinn_forward(q, full, v)[:2])
            dec = jax.jit(lambda q, z: ibinn.ibinn_inverse(q, full, z))
            t0 = time.perf_counter()
            ce = enc.lower(fp, x64).compile()
            t1 = time.perf_counter()
            z, _ = ce(fp, x64)
            t2 = time.perf_counter()
            dec.lower(fp, z).compile()
            t3 = time.perf_counter()
            compiled[scan] = (t1 - t0, t3 - t2, np.asarray(z))
        finally:
            ibinn.SCAN_BLOCKS = True
    res["compile_24_24_blocks_batch_64"] = {
        "unrolled_encode_s": compiled[False][0], "scanned_encode_s": compiled[True][0],
        "unrolled_decode_s": compiled[False][1], "scanned_decode_s": compiled[True][1],
        "max_abs_z_difference": float(np.abs(compiled[False][2] - compiled[True][2]).max())}
    c = res["compile_24_24_blocks_batch_64"]
    print(f"24 + 24 blocks, batch 64: encode compiles in {c['unrolled_encode_s']:.1f} s unrolled, {c['scanned_encode_s']:.1f} s scanned; "
          f"decode {c['unrolled_decode_s']:.1f} s / {c['scanned_decode_s']:.1f} s; max |z difference| {c['max_abs_z_difference']:.1e}", flush=True)

    # (2) ECINN on the shipped flow
    params, config, _, images, _ = bench_ecinn.load(bench_ecinn.IBINN_MODEL)
    step, refine = bench_ecinn.cli_settings()
    res["settings"].update(step=step, refine=refine)
    sizes = [int(s) for s in a.sizes.split(",")]
    xs = {b: jnp.asarray(np.resize(images, (b, *images.shape[1:])).astype(np.float32)) for b in sizes}

    def build(scan: bool):
        ibinn.SCAN_BLOCKS = scan
        try:
            fn = bench_ecinn.cfjax_fn(config, step, bench_ecinn.DIRECTION, refine)
            first, outs = {}, {}
            for b in sizes:  # trace and compile now, with the chosen setting
                t0 = time.perf_counter()
                outs[b] = jax.block_until_ready(fn(params, xs[b]))
                first[b] = time.perf_counter() - t0
            return fn, first, outs
        finally:
            ibinn.SCAN_BLOCKS = True

    f_scan, first_scan, out_scan = build(True)
    f_unr, first_unr, out_unr = build(False)
    for b in sizes:
        calls = {"scanned": lambda b=b: jax.block_until_ready(f_scan(params, xs[b])),
                 "unrolled": lambda b=b: jax.block_until_ready(f_unr(params, xs[b]))}
        t = common.interleaved(calls, a.repeats)
        s, u = common.median(t["scanned"]), common.median(t["unrolled"])
        row = {"batch": b, "first_call_scanned_s": first_scan[b], "first_call_unrolled_s": first_unr[b],
               "scanned_s": s, "unrolled_s": u, "scanned_cf_per_s": b / s, "unrolled_cf_per_s": b / u, "speedup": u / s,
               "max_abs_x_cf_difference": float(jnp.abs(out_scan[b]["x_cf"] - out_unr[b]["x_cf"]).max()),
               "same_refine_rounds": bool((out_scan[b]["refine_rounds"] == out_unr[b]["refine_rounds"]).all()), "times": t}
        res["rows"].append(row)
        print(f"batch {b}: first call {first_unr[b]:.1f} s unrolled, {first_scan[b]:.1f} s scanned; then unrolled {b / u:.1f} cf/s, "
              f"scanned {b / s:.1f} cf/s -> {u / s:.2f}x; max |x_cf difference| {row['max_abs_x_cf_difference']:.1e}", flush=True)
    common.save_ab(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
