"""A/B of the DIP generator's convolutions in DISC: patches x matrix against lax.conv, one process.

    python -m benchmarks.dip_conv [--sizes 16,64] [--fit-steps 30] [--steps 30] [--repeats 3]
        [--out benchmarks/results/dip_conv_cpu.json]

Every DISC query has its own DIP generator, so under ``jax.vmap`` a convolution of the generator
is a grouped convolution with one feature group per query when written with
``lax.conv_general_dilated`` (``DIP(patch_conv=False)``, the code before), and a batched matmul
over shifted slices of the input with ``priors._patch_conv`` (``patch_conv=True``, what cfjax runs).
Timed interleaved at each batch size, both programs compiled first:

- ``fit``: the generators' fit to the queries (``--fit-steps`` Adam steps; DISC's default is 300);
- ``generate``: a whole ``disc.generate`` with DISC's defaults (DIP prior, DUQ manifold model,
  jitter, progressive stages) but ``--steps`` optimisation and ``--fit-steps`` fit steps.

Also recorded: the largest difference between the two renders of the same parameters (float32
summation order) and each program's fit MSE.
"""

from __future__ import annotations

import dataclasses

import numpy as np

def main(argv=None) -> int:
    from benchmarks import common

    p = common.ab_parser("dip_conv", __doc__, "16,64", 3)
    p.add_argument("--fit-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args(argv)
    from cfjax import xla_cpu

    flags = xla_cpu.apply("disc")
    import jax
    import jax.numpy as jnp

    from cfjax import model_dirs
    from cfjax.data import load_dataset
    from cfjax.methods import disc
    from cfjax.models import priors
    from cfjax.pipelines.explain_disc import duq_from_dir
    from cfjax.pretrained import default_model_dir

    clf = model_dirs.load("classifier", default_model_dir("classifier", "mnist5k"))
    duq = duq_from_dir(default_model_dir("duq", "mnist5k"))
    images = load_dataset("mnist5k", "test").images
    base = dataclasses.replace(disc.DISCConfig(), steps=a.steps, fit_steps=a.fit_steps)
    cfgs = {side: dataclasses.replace(base, prior_options=(("patch_conv", side == "patch"),)) for side in ("patch", "lax")}

    def build(side: str, b: int):
        """The two timed calls at batch b for one side, compiled now; its fitted images and MSE."""
        cfg = cfgs[side]
        prior = cfg.make_prior()
        x = jnp.asarray(images[:b])
        t = jnp.asarray((np.argmax(np.asarray(clf.apply(clf.params, x)), -1) + 1) % 10, jnp.int32)
        params, aux = jax.jit(jax.vmap(prior.init))(jax.random.split(jax.random.key(0), b), x)
        lr = float(cfg.fit_lr or prior.default_lr)
        fit = jax.jit(jax.vmap(lambda p_, a_, q: priors.fit_to_query(prior, p_, a_, q, a.fit_steps, lr)))
        fitted = jax.block_until_ready(fit(params, aux, x))
        gen = lambda: disc.generate(clf.apply, clf.params, x, t, cfg, duq=duq)["x_cf"]  # noqa: E731
        jax.block_until_ready(gen())
        img = np.asarray(jax.jit(jax.vmap(prior.render))(fitted[0], aux))
        calls = {f"fit_{side}": lambda: jax.block_until_ready(fit(params, aux, x)), f"generate_{side}": lambda: jax.block_until_ready(gen())}
        return calls, img, float(jnp.mean(fitted[1])), (params, aux)

    res = common.ab_result("dip_conv", argv, flags, {"fit_steps": a.fit_steps, "steps": a.steps, "repeats": a.repeats,
                                                     "config": "DISCConfig() defaults otherwise"})
    for b in [int(s) for s in a.sizes.split(",")]:
        calls_p, img_p, mse_p, (params, aux) = build("patch", b)
        calls_l, img_l, mse_l, _ = build("lax", b)
        t = common.interleaved({**calls_p, **calls_l}, a.repeats)
        same = np.asarray(jax.jit(jax.vmap(cfgs["patch"].make_prior().render))(params, aux))
        ref = np.asarray(jax.jit(jax.vmap(cfgs["lax"].make_prior().render))(params, aux))
        m = {k: common.median(v) for k, v in t.items()}
        row = {"batch": b, **{f"{k}_s": v for k, v in m.items()},
               "fit_speedup": m["fit_lax"] / m["fit_patch"], "generate_speedup": m["generate_lax"] / m["generate_patch"],
               "max_abs_render_difference_same_params": float(np.abs(same - ref).max()),
               "fit_mse_patch": mse_p, "fit_mse_lax": mse_l, "max_abs_fitted_image_difference": float(np.abs(img_p - img_l).max()),
               "times": t}
        res["rows"].append(row)
        print(f"batch {b}: fit {m['fit_lax']:.2f} s -> {m['fit_patch']:.2f} s ({row['fit_speedup']:.1f}x); "
              f"generate {m['generate_lax']:.2f} s -> {m['generate_patch']:.2f} s ({row['generate_speedup']:.1f}x); "
              f"render difference {row['max_abs_render_difference_same_params']:.1e}", flush=True)
    common.save_ab(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
