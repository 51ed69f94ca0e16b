"""Peak host memory of one call at each benchmark's headline setting, cfjax vs twin.

    python -m benchmarks.memory [--out benchmarks/results/memory_cpu.json]

Per call: freed heap returned to the system (gc + malloc_trim), peak-RSS counter reset, then
VmHWM - VmRSS before (see benchmarks.common.peak_rss_mb). After one warm-up call each, so
compiled code and weights are not counted, only the call's working set.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks import bench_disc, bench_ecinn, bench_train_flow, common
    from benchmarks.twins import disc as tdisc
    from benchmarks.twins.flow import TwinFlowClassifier, TwinTrainer, ecinn_next_class
    from cfjax.methods import disc

    torch.set_num_threads(1)
    out = {}
    # ECINN, batch 256
    params, config, twin, images, _ = bench_ecinn.load()
    b = bench_ecinn.HEADLINE
    x = np.resize(images, (b, 28, 28, 1)).astype(np.float32)
    cf = bench_ecinn.cfjax_fn(config)
    xj, xt = jnp.asarray(x), torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    fj = lambda: jax.block_until_ready(cf(params, xj))  # noqa: E731
    ft = lambda: ecinn_next_class(twin, xt)  # noqa: E731
    fj(), ft()
    out["ecinn"] = {"batch": b, "cfjax_peak_mb": common.peak_rss_mb(fj), "twin_peak_mb": common.peak_rss_mb(ft)}
    # DISC, batch 256, 5 steps
    apply_fn, variables, _, ctwin, images, _ = bench_disc.load()
    b = bench_disc.HEADLINE
    x = np.resize(images, (b, 28, 28, 1)).astype(np.float32)
    t = bench_disc._targets(apply_fn, variables, jnp.asarray(x))
    cfg = tdisc.bench_config(5)
    xt, tt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(t)
    fj = lambda: jax.block_until_ready(disc.generate(apply_fn, variables, x, t, cfg, apply_kwargs={"train": False}))  # noqa: E731
    ft = lambda: tdisc.generate(ctwin, cfg, xt, tt)  # noqa: E731
    fj(), ft()
    out["disc"] = {"batch": b, "steps": 5, "cfjax_peak_mb": common.peak_rss_mb(fj), "twin_peak_mb": common.peak_rss_mb(ft)}
    # flow training, batch 64
    params, config, train, _ = bench_train_flow.load()
    b = bench_train_flow.HEADLINE
    step, opt = bench_train_flow._cfjax_step(config, train, bench_train_flow.TOTAL_STEPS)
    st = {"s": {"params": params, "opt_state": opt.init(params)}}
    xb, yb = train.images[:b], train.labels[:b]
    key = jax.random.PRNGKey(0)

    def fj():
        st["s"], m = step(st["s"], xb, yb, key)
        jax.block_until_ready((st["s"], m))

    trainer = TwinTrainer(TwinFlowClassifier(params, config, trainable=True), bench_train_flow.LR, bench_train_flow.TOTAL_STEPS)
    xt, yt = torch.as_tensor(xb).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(yb).long()
    ft = lambda: trainer.step(xt, yt)  # noqa: E731
    fj(), ft()
    out["train_flow"] = {"batch": b, "cfjax_peak_mb": common.peak_rss_mb(fj), "twin_peak_mb": common.peak_rss_mb(ft)}
    res = {"benchmark": "memory", "device": common.device_info(), "versions": common.versions(), "load_average": common.load_average(),
           "what": common.peak_rss_mb.__doc__.split("\n\n")[0].strip() if common.peak_rss_mb.__doc__ else "", "results": out,
           "jax_device_peak_mb": common.jax_device_peak_mb()}
    print(json.dumps(out))
    common.save_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
