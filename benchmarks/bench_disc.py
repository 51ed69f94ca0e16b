"""DISC optimisation steps/s x batch: cfjax ``disc.generate`` vs the torch twin, interleaved.

Configuration on both sides: :func:`benchmarks.twins.disc.bench_config` (pixels prior, one
cross-entropy stage of ``steps`` Adam steps, BN statistics + TV + l2 + l1, no DUQ), the shipped
mnist5k CNN classifier, target = next class. One timed call = a whole ``generate`` (init, the
optimisation, final prediction); throughput = steps x batch / time. cfjax's batch is split over
all local devices when it divides evenly, as ``cfjax explain disc`` does (on a CPU,
``cfjax.xla_cpu`` makes one host device per core for DISC; ``benchmarks.run`` applies it); the
twin is plain torch with its own threads.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from benchmarks import common

# float32 tolerances. Loss values agree to round-off (loss_start is relative: max |diff| / max(1, |loss|)). Adam divides by sqrt(v): pixels whose
# gradient is ~1e-9 (saturated sigmoid), or whose l1 gradient sign(x - query) is decided by
# round-off at the start, move by +-lr whichever way round-off tips the sign, so
# iterates drift apart slowly with steps (measured 1.4e-4 after 1 step, 3.5e-3 after 5 on 16
# queries); hence the looser bounds after a few steps.
TOL = {"loss_start": 1e-5, "x_cf_1_step": 1e-3, "x_cf_3_steps": 1e-2, "probs_cf_3_steps": 1e-3}
SIZES = (1, 4, 16, 64, 256, 1024)
QUICK_SIZES = (1, 8, 32)
HEADLINE = 256


def load():
    import torch

    from benchmarks.twins.disc import TwinCNN
    from cfjax.data import load_dataset
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pretrained import default_model_dir

    apply_fn, variables, config, _ = load_classifier(default_model_dir("classifier", "mnist5k"))
    twin = TwinCNN(variables, config)
    images = load_dataset("mnist5k", "test").images
    return apply_fn, variables, config, twin, images, torch


def _targets(apply_fn, variables, x):
    return (np.argmax(np.asarray(apply_fn(variables, x)), -1) + 1) % 10


def flops_count(apply_fn, variables, cfg, b: int, image_shape) -> dict:
    """:func:`benchmarks.roofline.jaxpr_flops` of one whole ``disc.generate`` call at batch ``b``:
    the query forward pass, the stage (:func:`cfjax.methods.disc.run_stage`: its jitted begin,
    chunks of unrolled steps and end, driven by a host loop that traces through) and the final
    prediction."""
    import jax.numpy as jnp

    from benchmarks import roofline
    from cfjax.methods import disc

    x = jnp.zeros((b, *image_shape), jnp.float32)
    t = jnp.zeros((b,), jnp.int32)
    fwd = roofline.jaxpr_flops(lambda x: apply_fn(variables, x, train=False), x)
    prior, params, aux, _ = disc.initialize(cfg, x)
    stage = disc.make_stage(apply_fn, cfg, prior, apply_kwargs={"train": False})
    out = dict(roofline.jaxpr_flops(
        lambda p, a, xq, t: disc.run_stage(p, disc.StageData(a, xq, None, t, jnp.float32(1.0), variables, None), stage),
        params, aux, x, t))
    out["flops"] = out["flops"] + 2 * fwd["flops"]  # + the query's forward pass and the final prediction
    out["forward_pass_flops"] = fwd["flops"]
    return out


def parity(n: int = 16, loaded=None, steps_checked: tuple = (1, 3)) -> dict:
    """Loss values at the start, iterates after 1 and 3 steps (``steps_checked``); AssertionError
    beyond TOL (only the checks that ran)."""
    import jax.numpy as jnp

    from benchmarks.twins import disc as tdisc
    from cfjax.methods import disc

    apply_fn, variables, config, twin, images, torch = loaded or load()
    x = images[:n]
    t = _targets(apply_fn, variables, jnp.asarray(x))
    xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    tt = torch.as_tensor(t)
    d = {"n": n}
    for steps in steps_checked:
        cfg = tdisc.bench_config(steps)
        out = disc.generate(apply_fn, variables, x, t, cfg, apply_kwargs={"train": False})
        out_t = tdisc.generate(twin, cfg, xt, tt)
        d[f"x_cf_{steps}_step{'s' if steps > 1 else ''}"] = float(np.abs(np.asarray(out["x_cf"]).transpose(0, 3, 1, 2) - out_t["x_cf"].numpy()).max())
        if steps == 3:
            d["probs_cf_3_steps"] = float(np.abs(np.asarray(out["probs_cf"]) - out_t["probs_cf"].numpy()).max())
    # The objective itself (cfjax's per-example objective at the starting image).
    import jax

    cfg = tdisc.bench_config(1)
    prior, params, aux, _ = disc.initialize(cfg, jnp.asarray(x))
    stage = disc.make_stage(apply_fn, cfg, prior, apply_kwargs={"train": False})
    x0 = jax.vmap(prior.render)(params, aux)
    _, per_ex, _ = disc.image_objective(x0, disc.StageData(aux, jnp.asarray(x), None, jnp.asarray(t), 1.0, variables, None), stage)
    with torch.no_grad():
        per_t, _ = tdisc.objective(twin, cfg, torch.as_tensor(np.array(x0)).permute(0, 3, 1, 2), xt, tt)
    # relative to max(1, |loss|): float32 round-off of a sum of terms grows with the loss (the
    # doubled-weights test reaches losses of ~340, where 1e-4 absolute is 3e-7 relative).
    d["loss_start"] = float((np.abs(np.asarray(per_ex) - per_t.numpy()) / np.maximum(1.0, np.abs(per_t.numpy()))).max())
    d["loss_start_mean"] = float(np.mean(np.asarray(per_ex)))
    bad = [k for k in TOL if k in d and not d[k] <= TOL[k]]
    if bad:
        raise AssertionError(f"DISC twin parity failed ({', '.join(bad)}): {d} vs tolerances {TOL}")
    return d


def run(quick: bool = False, budget_s: float = 150.0, repeats: int | None = None, sizes: tuple | None = None, steps: int | None = None, log=print) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks import roofline
    from benchmarks.twins import disc as tdisc
    from cfjax.methods import disc
    from cfjax.pipelines.sharding import batch_mesh, mesh_size, replicate, shard_batch

    res = common.base_result("disc", quick)
    loaded = load()
    apply_fn, variables, config, twin, images, torch = loaded
    res["parity"] = parity(8 if quick else 16, loaded)
    res["tolerances"] = TOL
    log(f"disc parity ok: {res['parity']}")
    steps = steps or (3 if quick else 5)
    cfg = tdisc.bench_config(steps)
    sizes = tuple(sizes) if sizes else (QUICK_SIZES if quick else SIZES)
    reps = repeats or 3
    head_fns = None
    dev = res["twin_device"] = common.twin_device()
    if dev != "cpu":  # parity was checked on the CPU twin; time a copy on the device
        with common.twin_context(dev):
            twin = tdisc.TwinCNN(variables, config)
    # cfjax.xla_cpu gives DISC one host device per core; the CLI splits the batch over all of them
    mesh = batch_mesh(0)
    variables_r = replicate(variables, mesh)
    res["cfjax_devices"] = mesh_size(mesh)
    log(f"disc: cfjax over {mesh_size(mesh)} local device(s)")
    rows, prev = [], None
    for b in sizes:
        skip = common.budget_skip(prev, b, reps, budget_s, 5)
        if skip is not None:
            rows.append(skip)
            log(f"disc batch {b}: skipped ({skip['reason']})")
            continue
        x = np.resize(images, (b, *images.shape[1:])).astype(np.float32)
        t = _targets(apply_fn, variables, jnp.asarray(x))
        xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous().to(dev)
        tt = torch.as_tensor(t).to(dev)

        if mesh is not None and b % mesh_size(mesh) == 0:  # as `cfjax explain disc` runs it: a slice per device
            xj, tj_, vj = shard_batch(x, mesh), shard_batch(jnp.asarray(t, jnp.int32), mesh), variables_r
        else:
            xj, tj_, vj = x, t, variables

        def f_jax(x=xj, t=tj_, v=vj):  # bound: kept for the roofline
            return jax.block_until_ready(disc.generate(apply_fn, v, x, t, cfg, apply_kwargs={"train": False}))

        f_torch = common.on_twin_device(lambda xt=xt, tt=tt: tdisc.generate(twin, cfg, xt, tt), dev)  # noqa: E731
        row = common.time_pair(b, f_jax, f_torch, reps, steps * b, "step_images_per_s", b == (HEADLINE if HEADLINE in sizes else sizes[-1]), False)
        if b == (HEADLINE if HEADLINE in sizes else sizes[-1]):
            head_fns = {"cfjax": f_jax, "twin": f_torch}
        tj, tw = row["cfjax_s"], row["twin_s"]
        rows.append(row)
        prev = row
        log(f"disc batch {b}: cfjax {steps * b / tj:.0f} step-images/s, twin {steps * b / tw:.0f}, speedup {tw / tj:.2f}x")
    common.set_headline(res, rows, HEADLINE if HEADLINE in sizes else sizes[-1], 1.25)  # issue 14: DISC at batch 256 >= 1.25x its twin
    roofline.attach(res, lambda b: flops_count(apply_fn, variables, cfg, b, images.shape[1:]), log=log, headline_fns=head_fns)
    res["settings"] = {"model": "cfjax/pretrained/mnist5k_classifier", "config": {k: v for k, v in vars(cfg).items()},
                       "target": "next", "steps_per_call": steps, "repeats": reps,
                       "timing": "median of interleaved repeats after one warm-up call; one call = a whole generate()",
                       "cfjax_devices": "cfjax's batch split over this many local devices (XLA:CPU host devices, one per core, "
                                        "set by cfjax.xla_cpu for DISC), one slice per device, as `cfjax explain disc` runs it",
                       "twin": "plain torch eager, Adam, per-example losses summed",
                       "memory": "peak_rss_mb: extra host RSS high-water (VmHWM after resetting it) during one call at the headline batch"}
    common.stamp_end(res)
    return res


plot = partial(common.plot_throughput, x_key="batch", y_key="step_images_per_s", xlabel="concurrent counterfactuals (batch)", ylabel="optimisation steps x batch / s")
