"""What each ECINN step rule costs: counterfactuals/s of the shipped IB-INN flow, the rules timed
side by side (interleaved repeats, one process), with the FLOPs of each program as it ran (its jaxpr,
refinement counted per query moved: benchmarks.bench_ecinn.executed_count).

    python -m benchmarks.step_rules [--batch 256] [--repeats 7] [--out DIR]

Writes ``ecinn_step_rules_<device>.json`` under benchmarks/results/ (or --out). Runs with the
XLA flags of ``cfjax explain ecinn`` (``cfjax.xla_cpu``). Rows: the paper's
exact method (``paper``, no refinement: two network passes), the authors' rule with the CLI's
refinement (``code``, 2 rounds) and the CLI default (``adaptive``: three candidate decodes in one
batched call, 2 rounds). Ratios are to ``code`` in the same run.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common

RULES = (("paper", 0), ("code", 2), ("adaptive", 2))


def run(batch: int = 256, repeats: int = 7, log=print) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.bench_ecinn import cfjax_fn, executed_count
    from cfjax.data import load_dataset
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    res = common.base_result("ecinn_step_rules", False)
    params, config, _ = load_flow(default_model_dir("flow", "mnist5k"))
    images = load_dataset("mnist5k", "test").images
    x = jnp.asarray(np.resize(images, (batch, *images.shape[1:])).astype(np.float32))

    fns, flops = {}, {}
    for step, refine in RULES:
        name = f"{step}, refine {refine}"
        cf = cfjax_fn(config, step, "predicted_means", refine)
        fns[name] = lambda cf=cf: jax.block_until_ready(cf(params, x))  # noqa: E731
        common.timed(fns[name])  # compile
        flops[name] = executed_count(params, config, x, step, refine, cf(params, x))
    times = common.interleaved(fns, repeats)
    base = common.median(times["code, refine 2"])
    rows = []
    for name, ts in times.items():
        t = common.median(ts)
        rows.append({"rule": name, "seconds_median": t, "cf_per_s": batch / t, "time_vs_code": t / base,
                     "flops_per_cf": flops[name]["flops"] / batch, "moved_query_rounds": flops[name].get("moved_query_rounds", 0),
                     "times": ts})
        log(f"{name:20s} {batch / t:7.0f} cf/s  {t / base:5.2f}x the time of code")
    res.update(rows=rows, batch=batch, repeats=repeats, model="cfjax/pretrained/mnist5k_flow (IB-INN network)", target="next",
               load_average_end=common.load_average())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_rules", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    from cfjax import xla_cpu

    added = xla_cpu.apply("ecinn")  # the XLA flags `cfjax explain ecinn` runs with (before JAX starts)
    res = run(args.batch, args.repeats)
    res["xla_flags_added"] = added
    path = common.write_result(res, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
