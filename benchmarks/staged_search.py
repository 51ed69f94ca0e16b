"""A/B of the search rule's staged decodes against decoding every candidate for every query, in one process.

    python -m benchmarks.staged_search [--sizes 1,16,256] [--repeats 7] [--out benchmarks/results/staged_search_cpu.json]

ECINN with the CLI's defaults (``adaptive-wide``, 2 refinement rounds) on the shipped IB-INN
flow (``mnist5k_flow``), next-class targets, timed interleaved. "staged" is what cfjax runs
(:func:`cfjax.methods.ecinn.step_and_decode`: the first candidate for every query, each next one
only for the queries whose decodes so far all left the pixel range, in sub-batches); "decode
all" is the search as first written (every candidate of every query in one batched decode, then
the first in range per query), :func:`decode_all`, swapped in while the program is traced. The
XLA flags are cfjax's for ECINN. The two programs' outputs are compared (largest |x_cf
difference|, same candidate kept, same refinement rounds); per row also how many queries reached
each candidate.
"""

from __future__ import annotations


import numpy as np

def decode_all(params, config, z, source, target, step="paper", direction="predicted_means", residual=1.0):
    """The search rule decoding all K candidates of every query in one call (K B rows), keeping the
    first within the tolerance (else the last): :func:`cfjax.methods.ecinn.step_and_decode`'s result."""
    import jax.numpy as jnp

    from cfjax.methods import ecinn
    from cfjax.models.flow_classifier import decode

    rules, tolerance = ecinn.SEARCH_RULES[step]
    steps = [ecinn.latent_step(params["latent"], params["class_means"], z, source, target, r, direction, residual) for r in rules]
    bsz, k = z.shape[0], len(rules)
    z_all = jnp.concatenate([s[0] for s in steps])
    x_raw = decode(params, config, z_all)
    ok = (ecinn.out_of_range(x_raw) <= tolerance).reshape(k, bsz).at[-1].set(True)
    pick = jnp.argmax(ok, axis=0)
    rows = pick * bsz + jnp.arange(bsz)
    alpha = jnp.stack([s[2] for s in steps])[pick, jnp.arange(bsz)]
    return jnp.clip(x_raw[rows], 0.0, 1.0), z_all[rows], steps[0][1], alpha, pick


def main(argv=None) -> int:
    from benchmarks import common

    a = common.ab_parser("staged_search", __doc__, "1,16,256", 7).parse_args(argv)
    from cfjax import xla_cpu

    flags = xla_cpu.apply("ecinn")
    import time
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from benchmarks import bench_ecinn
    from cfjax.methods import ecinn

    params, config, _, images, _ = bench_ecinn.load(bench_ecinn.IBINN_MODEL)
    step, refine = bench_ecinn.cli_settings()
    if not ecinn.is_search_rule(step):
        raise SystemExit(f"the CLI's step {step!r} is not a search rule: nothing to compare")
    sizes = [int(s) for s in a.sizes.split(",")]
    xs = {b: jnp.asarray(np.resize(images, (b, *images.shape[1:])).astype(np.float32)) for b in sizes}

    def build(staged: bool):  # one jitted program per variant; every batch size traced and compiled now
        fn = bench_ecinn.cfjax_fn(config, step, bench_ecinn.DIRECTION, refine)
        outs, compile_s = {}, {}
        with mock.patch.object(ecinn, "step_and_decode", ecinn.step_and_decode if staged else decode_all):
            for b in sizes:
                t0 = time.perf_counter()
                outs[b] = jax.block_until_ready(fn(params, xs[b]))
                compile_s[b] = time.perf_counter() - t0
        return fn, outs, compile_s

    res = common.ab_result("staged_search", argv, flags, {"model": "cfjax/pretrained/mnist5k_flow", "step": step, "refine": refine,
                                                          "target": "next", "repeats": a.repeats})
    f_all, out_all, comp_all = build(False)
    f_st, out_st, comp_st = build(True)
    k = len(ecinn.SEARCH_RULES[step][0])
    for b in sizes:
        calls = {"staged": lambda b=b: jax.block_until_ready(f_st(params, xs[b])), "decode_all": lambda b=b: jax.block_until_ready(f_all(params, xs[b]))}
        t = common.interleaved(calls, a.repeats)
        st, al = common.median(t["staged"]), common.median(t["decode_all"])
        cand = np.asarray(out_st[b]["candidate"])
        row = {"batch": b, "staged_s": st, "decode_all_s": al, "staged_cf_per_s": b / st, "decode_all_cf_per_s": b / al, "speedup": al / st,
               "staged_first_call_s": comp_st[b], "decode_all_first_call_s": comp_all[b],
               "queries_reaching_candidate": [int((cand >= j).sum()) for j in range(k)],
               "max_abs_x_cf_difference": float(jnp.abs(out_st[b]["x_cf"] - out_all[b]["x_cf"]).max()),
               "same_candidate": bool((cand == np.asarray(out_all[b]["candidate"])).all()),
               "same_refine_rounds": bool((out_st[b]["refine_rounds"] == out_all[b]["refine_rounds"]).all()), "times": t}
        res["rows"].append(row)
        print(f"batch {b}: decode all {b / al:.1f} cf/s, staged {b / st:.1f} cf/s -> {al / st:.2f}x; first call {comp_all[b]:.1f} -> "
              f"{comp_st[b]:.1f} s; queries per candidate {row['queries_reaching_candidate']}; "
              f"max |x_cf difference| {row['max_abs_x_cf_difference']:.1e}", flush=True)
    common.save_ab(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
