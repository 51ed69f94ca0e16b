"""A/B of folding BatchNorm into the convolutions in the IB-INN flow's eval mode, in one process.

    python -m benchmarks.bn_fold [--sizes 1,16,256] [--repeats 7] [--out benchmarks/results/bn_fold_cpu.json]

ECINN with the CLI's defaults on the shipped IB-INN flow (``mnist5k_flow``), next-class targets,
timed interleaved with the fold on (what cfjax runs) and off (``cfjax.models.ibinn.FOLD_BATCHNORM``
= False while the program is traced: conv, then the BatchNorm affine map, the code before the
fold). The XLA flags are cfjax's for ECINN (set before JAX starts). Outputs of the two
programs are compared (largest |x_cf difference|, same refinement rounds).
"""

from __future__ import annotations


import numpy as np

def main(argv=None) -> int:
    from benchmarks import common

    a = common.ab_parser("bn_fold", __doc__, "1,16,256", 7).parse_args(argv)
    from cfjax import xla_cpu

    flags = xla_cpu.apply("ecinn")
    import jax
    import jax.numpy as jnp

    from benchmarks import bench_ecinn
    from cfjax.models import ibinn

    params, config, _, images, _ = bench_ecinn.load(bench_ecinn.IBINN_MODEL)
    step, refine = bench_ecinn.cli_settings()
    def build(fold: bool):
        ibinn.FOLD_BATCHNORM = fold
        try:
            fn = bench_ecinn.cfjax_fn(config, step, bench_ecinn.DIRECTION, refine)
            # trace and compile now, with the chosen setting (jit traces on the first call)
            return fn, {b: jax.block_until_ready(fn(params, xs[b])) for b in xs}
        finally:
            ibinn.FOLD_BATCHNORM = True

    sizes = [int(s) for s in a.sizes.split(",")]
    xs = {b: jnp.asarray(np.resize(images, (b, *images.shape[1:])).astype(np.float32)) for b in sizes}
    res = common.ab_result("bn_fold", argv, flags, {"model": "cfjax/pretrained/mnist5k_flow", "step": step, "refine": refine,
                                                     "target": "next", "repeats": a.repeats})
    f_on, out_on = build(True)
    f_off, out_off = build(False)
    for b in sizes:
        calls = {"folded": lambda b=b: jax.block_until_ready(f_on(params, xs[b])), "unfolded": lambda b=b: jax.block_until_ready(f_off(params, xs[b]))}
        t = common.interleaved(calls, a.repeats)
        on, off = common.median(t["folded"]), common.median(t["unfolded"])
        row = {"batch": b, "folded_s": on, "unfolded_s": off, "folded_cf_per_s": b / on, "unfolded_cf_per_s": b / off, "speedup": off / on,
               "max_abs_x_cf_difference": float(jnp.abs(out_on[b]["x_cf"] - out_off[b]["x_cf"]).max()),
               "same_refine_rounds": bool((out_on[b]["refine_rounds"] == out_off[b]["refine_rounds"]).all()), "times": t}
        res["rows"].append(row)
        print(f"batch {b}: unfolded {b / off:.1f} cf/s, folded {b / on:.1f} cf/s -> {off / on:.2f}x; max |x_cf difference| {row['max_abs_x_cf_difference']:.1e}", flush=True)
    common.save_ab(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
