"""ECINN counterfactuals/s vs batch size: cfjax (jit) vs the FrEIA twin, same process, interleaved.

Setting on both sides: the shipped mnist5k flow, target = next class, the CLI defaults
(step "short", direction "predicted_means", 2 refinement rounds: 6 network passes per query).

Roofline (benchmarks.roofline): FLOPs per counterfactual from the jaxpr of the timed program,
achieved GFLOP/s of both sides, and the ceilings measured in the same run. The shipped IB-INN
flow (``mnist5k_flow``, the CLI's default model) is timed the same way against its own twin
(``benchmarks.twins.ibinn``, parity asserted first) with the CLI's ECINN settings (``ibinn_part``).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from benchmarks import common

STEP, DIRECTION, REFINE = "short", "predicted_means", 2
# float32 tolerances (max abs difference); logdets are ~3e3 nats, so ~3e-7 relative.
TOL = {"latent_z": 1e-4, "logdet": 1e-2, "decode_x": 1e-4, "x_cf": 1e-3}
SIZES = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_SIZES = (1, 8, 32)
HEADLINE = 256


GLOW_MODEL, IBINN_MODEL = "mnist5k_glow", "mnist5k"


def load(model: str = GLOW_MODEL):
    """(params, config, twin, test images, torch) for a shipped flow: ``"mnist5k_glow"`` (the
    FrEIA twin) or ``"mnist5k"`` (the IB-INN flow and its plain-torch twin)."""
    import torch

    from benchmarks.twins.flow import TwinFlowClassifier
    from benchmarks.twins.ibinn import TwinIBINNClassifier
    from cfjax.data import load_dataset
    from cfjax.models.flow_classifier import is_ibinn
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    params, config, _ = load_flow(default_model_dir("flow", model))
    twin = (TwinIBINNClassifier if is_ibinn(config) else TwinFlowClassifier)(params, config).eval()
    images = load_dataset("mnist5k", "test").images
    return params, config, twin, images, torch


def cfjax_fn(config, step=STEP, direction=DIRECTION, refine=REFINE):
    import jax
    import jax.numpy as jnp

    from cfjax.methods import ecinn
    from cfjax.models import flow_classifier as fc

    @jax.jit
    def cf(params, x):
        z, _ = fc.encode(params, config, x)
        y = jnp.argmax(fc.latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test), -1)
        return ecinn.counterfactual_from_latent(params, config, z, y, (y + 1) % config.num_classes, step, direction, refine)

    return cf


def executed_count(params, config, x, step, refine: int, out) -> dict:
    """:func:`benchmarks.roofline.jaxpr_flops` of the ECINN program as it ran on x (B, H, W, C),
    with ``out`` its result (``candidate`` and ``refine_rounds`` per query). A search rule decodes
    its candidates in a ``while_loop`` that decodes candidate k only for the queries whose
    candidates before it all left the pixel range, and refinement is a ``while_loop`` that stops
    when every query is done and moves only the queries not yet done, so the static count (a loop
    body once, a ``cond``'s costlier branch) is not the work done. Counted instead: the program
    without refinement with one decode per candidate tried (``candidate`` + 1 per query), the
    check (one encode of the batch) and, per round that ran, one decode + one encode of each query
    it moved (the useful work; cfjax pads a sub-batch to one of :func:`cfjax.methods.ecinn.subbatch_sizes`, the twin takes
    exactly those queries)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import roofline
    from cfjax.models import flow_classifier as fc

    xj = jnp.asarray(x)
    base = roofline.jaxpr_flops(cfjax_fn(config, step, DIRECTION, 0), params, xj)
    encode = lambda p, v: fc.encode(p, config, v)[0]  # noqa: E731
    enc = roofline.jaxpr_flops(encode, params, xj)["flops"]
    zs = jax.eval_shape(encode, params, xj)
    z = jnp.zeros(zs.shape, zs.dtype)
    dec = roofline.jaxpr_flops(lambda p, v: fc.decode(p, config, v), params, z)["flops"]
    rounds = np.asarray(out["refine_rounds"])
    tried = int((np.asarray(out["candidate"]) + 1).sum())  # query-candidates decoded
    moved = sum(int((rounds >= k).sum()) for k in range(1, int(refine) + 1))  # query-rounds
    n = len(rounds)
    # the static count holds one decode of the batch (a search loop's body once, its whole-batch branch)
    flops = base["flops"] - dec + tried * dec / n + (enc + moved * (enc + dec) / n if refine else 0.0)
    return {**base, "flops": flops, "static_refine_0_flops": base["flops"], "check_flops": enc if refine else 0.0,
            "decoded_query_candidates": tried, "moved_query_rounds": moved}


def cli_settings() -> tuple:
    """The ECINN step rule and refinement rounds of ``cfjax explain ecinn`` (its defaults)."""
    try:
        from cfjax.pipelines.explain_ecinn import DEFAULT_REFINE, DEFAULT_STEP
    except ImportError:  # the command's module reorganised: the documented defaults
        DEFAULT_STEP, DEFAULT_REFINE = "code", 2
    return DEFAULT_STEP, DEFAULT_REFINE


def ibinn_part(sizes, reps: int, budget_s: float, quick: bool = False, log=print) -> dict:
    """The shipped IB-INN flow (the CLI's default model) against its twin, with the CLI's ECINN
    settings: parity, rows and roofline columns, as :func:`run` does for the Glow flow."""
    loaded = load(IBINN_MODEL)
    step, refine = cli_settings()
    part = {"parity": parity(16 if quick else 64, loaded, step, refine), "tolerances": TOL}
    log(f"ecinn (IB-INN flow) parity ok: {part['parity']}")
    _timed_rows(part, loaded, sizes, reps, budget_s, step, refine, "ecinn (IB-INN flow)", log)
    part["settings"] = {"model": "cfjax/pretrained/mnist5k_flow (IB-INN network)", "step": step, "direction": DIRECTION,
                        "refine": refine, "target": "next", "repeats": reps,
                        "twin": "benchmarks.twins.ibinn (plain torch, NCHW), eager, inference_mode"}
    return part


def _timed_rows(res: dict, loaded, sizes, reps: int, budget_s: float, step, refine: int, label: str, log=print) -> None:
    """Rows cfjax vs twin over ``sizes`` (interleaved), headline and roofline columns, into ``res``."""
    import jax
    import jax.numpy as jnp

    from benchmarks import roofline
    from benchmarks.twins.flow import ecinn_next_class
    from cfjax.pipelines.sharding import batch_mesh, mesh_size, replicate, shard_batch

    params, config, twin, images, torch = loaded
    cf = cfjax_fn(config, step, DIRECTION, refine)
    # as `cfjax explain ecinn` runs it: the batch split over every local device (one XLA host
    # device per core where cfjax.xla_cpu sets them for ECINN), parameters replicated
    mesh = batch_mesh(0)
    params_r = replicate(params, mesh)
    res["cfjax_devices"] = mesh_size(mesh)
    dev = res["twin_device"] = common.twin_device()
    if dev != "cpu":  # parity was checked on the CPU twin; time a copy on the device
        with common.twin_context(dev):
            twin = type(twin)(params, config).eval()
    head = HEADLINE if HEADLINE in sizes else sizes[-1]
    rows, prev, head_fns = [], None, None
    for b in sizes:
        skip = common.budget_skip(prev, b, reps, budget_s, 5)
        if skip is not None:
            rows.append(skip)
            log(f"{label} batch {b}: skipped ({skip['reason']})")
            continue
        x = np.resize(images, (b, *images.shape[1:])).astype(np.float32)
        sharded = mesh is not None and b % mesh_size(mesh) == 0
        xj, pj = (shard_batch(x, mesh), params_r) if sharded else (jnp.asarray(x), params)
        xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous().to(dev)
        f_jax = lambda xj=xj, pj=pj: jax.block_until_ready(cf(pj, xj))  # noqa: E731 - bound: kept for the roofline
        f_torch = common.on_twin_device(lambda xt=xt: ecinn_next_class(twin, xt, step, refine), dev)  # noqa: E731
        row = common.time_pair(b, f_jax, f_torch, reps, b, "cf_per_s", b == head, False)
        row["cfjax_devices"] = mesh_size(mesh) if sharded else 1
        if b == head:
            head_fns = {"cfjax": f_jax, "twin": f_torch}
        rows.append(row)
        prev = row
        log(f"{label} batch {b}: cfjax {b / row['cfjax_s']:.0f} cf/s, twin {b / row['twin_s']:.0f} cf/s, speedup {row['speedup']:.2f}x")
    common.set_headline(res, rows, head, 3.0 if head <= 16 else 1.5)
    shape = images.shape[1:]

    def count_at(b):  # the work done on the row's queries (the refinement loop is data-dependent)
        x = np.resize(images, (b, *shape)).astype(np.float32)
        return executed_count(params, config, x, step, refine, cf(params, jnp.asarray(x)))

    roofline.attach(res, count_at, xla_at=lambda b: roofline.xla_flops(cf, params, jnp.zeros((b, *shape), jnp.float32)), log=log,
                    headline_fns=head_fns)


def parity(n: int = 64, loaded=None, step=STEP, refine: int = REFINE) -> dict:
    """Max abs differences cfjax vs twin on n test images (ECINN with ``step`` and ``refine``);
    raises AssertionError beyond TOL."""
    import jax
    import jax.numpy as jnp

    from benchmarks.twins.flow import ecinn_next_class
    from cfjax.models import flow_classifier as fc

    params, config, twin, images, torch = loaded or load()
    x = images[:n]
    xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    cf = cfjax_fn(config, step, DIRECTION, refine)

    @jax.jit
    def all_at_once(params, x):  # one compilation for the three checks
        z, ld = fc.encode(params, config, x)
        return z, ld, fc.decode(params, config, z), cf(params, x)

    z, ld, xr, out = all_at_once(params, jnp.asarray(x))
    with torch.inference_mode():
        zt, ldt = twin.encode(xt)
        xr_t = twin.decode(zt)
    out_t = ecinn_next_class(twin, xt, step, refine)
    d = {
        "n": n, "step": step, "refine": refine,
        "latent_z": float(np.abs(np.asarray(z) - zt.numpy()).max()),
        "logdet": float(np.abs(np.asarray(ld) - ldt.numpy()).max()),
        "decode_x": float(np.abs(np.asarray(xr).transpose(0, 3, 1, 2) - xr_t.numpy()).max()),
        "x_cf": float(np.abs(np.asarray(out["x_cf"]).transpose(0, 3, 1, 2) - out_t["x_cf"].numpy()).max()),
        "same_y_pred": bool((np.asarray(out["y_pred"]) == out_t["y_pred"].numpy()).all()),
        "same_refine_rounds": bool((np.asarray(out["refine_rounds"]) == out_t["rounds"].numpy()).all()),
    }
    bad = [k for k in TOL if not d[k] <= TOL[k]] + [k for k in ("same_y_pred", "same_refine_rounds") if not d[k]]
    if bad:
        raise AssertionError(f"ECINN twin parity failed ({', '.join(bad)}): {d} vs tolerances {TOL}")
    return d


def run(quick: bool = False, budget_s: float = 150.0, repeats: int | None = None, sizes: tuple | None = None, log=print,
        ibinn: bool = True) -> dict:
    res = common.base_result("ecinn", quick)
    loaded = load()
    res["parity"] = parity(16 if quick else 64, loaded)
    res["tolerances"] = TOL
    log(f"ecinn parity ok: {res['parity']}")
    sizes = tuple(sizes) if sizes else (QUICK_SIZES if quick else SIZES)
    reps = repeats or (3 if quick else 5)
    _timed_rows(res, loaded, sizes, reps, budget_s, STEP, REFINE, "ecinn", log)
    if ibinn:
        res["ibinn"] = ibinn_part(sizes, reps, budget_s, quick, log)
    res["settings"] = {"model": "cfjax/pretrained/mnist5k_glow_flow", "step": STEP, "direction": DIRECTION, "refine": REFINE,
                       "target": "next", "repeats": reps, "timing": "median of interleaved repeats after one warm-up call",
                       "twin": "FrEIA SequenceINN, torch eager, inference_mode", "cfjax": "jax.jit of encode + counterfactual_from_latent",
                       "memory": "peak_rss_mb: extra host RSS high-water (VmHWM after resetting it) during one call at the headline batch"}
    common.stamp_end(res)
    return res


plot = partial(common.plot_throughput, x_key="batch", y_key="cf_per_s", xlabel="batch size (queries)", ylabel="counterfactuals / s")
