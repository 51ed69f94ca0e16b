"""Why DISC runs its steps as unrolled chunks: the gradient step of the DISC objective on XLA:CPU,
straight-line vs inside a rolled loop (``lax.fori_loop``), same computation.

    python -m benchmarks.profile_loop [--batch 32] [--out benchmarks/results/profile_loop_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common
    from benchmarks.twins.disc import bench_config
    from cfjax.data import load_dataset
    from cfjax.methods import disc
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pretrained import default_model_dir

    apply_fn, variables, _, _ = load_classifier(default_model_dir("classifier", "mnist5k"))
    b, n = a.batch, a.steps
    x = jnp.asarray(np.resize(load_dataset("mnist5k", "test").images, (b, 28, 28, 1)))
    t = jnp.asarray((np.argmax(np.asarray(apply_fn(variables, x)), -1) + 1) % 10)
    cfg = bench_config(n)
    prior, params, aux, _ = disc.initialize(cfg, x)
    stage = disc.make_stage(apply_fn, cfg, prior, apply_kwargs={"train": False})

    def loss_one(p1, a1, q1, t1):  # one example: the objective of its rendered image
        x1 = prior.render(p1, a1)[None]
        return disc.image_objective(x1, disc.StageData(a1, q1[None], None, t1[None], 1.0, variables, None), stage)[0]

    def grad_step(p):
        return p - 0.01 * jax.vmap(jax.grad(loss_one))(p, aux, x, t)

    def rolled(p):
        return jax.lax.fori_loop(0, n, lambda i, pp: grad_step(pp), p)

    def unrolled(p):
        for _ in range(n):
            p = grad_step(p)
        return p

    fns = {"one_step": jax.jit(grad_step), "rolled_loop": jax.jit(rolled), "unrolled": jax.jit(unrolled)}
    for f in fns.values():
        jax.block_until_ready(f(params))
    calls = {k: (lambda f=f: jax.block_until_ready(f(params))) for k, f in fns.items()}
    tm = common.interleaved(calls, a.repeats)
    per_step = {"one_step": common.median(tm["one_step"]), "rolled_loop": common.median(tm["rolled_loop"]) / n, "unrolled": common.median(tm["unrolled"]) / n}
    res = {"benchmark": "profile_loop", "device": common.device_info(), "batch": b, "steps": n, "versions": common.versions(),
           "load_average": common.load_average(), "seconds_per_step": per_step,
           "rolled_over_unrolled": per_step["rolled_loop"] / per_step["unrolled"], "times": tm,
           "what": "vmapped per-example gradient of the DISC objective (shipped CNN, pixels prior) + an SGD update, per step"}
    print(json.dumps({k: res[k] for k in ("batch", "seconds_per_step", "rolled_over_unrolled", "load_average")}))
    common.save_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
