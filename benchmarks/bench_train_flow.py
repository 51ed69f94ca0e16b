"""Flow training images/s: cfjax's jitted IB-INN train step vs the FrEIA twin's, interleaved.

Both start from the shipped mnist5k flow weights with a fresh optimiser (clip 10, AdamW 1e-3 /
wd 1e-5 on the flow, Adam 1e-2 on the class means, warm-up + cosine over ``TOTAL_STEPS``), and
both dequantise the batch inside the step (U(0, 1/256) + N(0, 0.01^2), reflected).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from benchmarks import common

LR, TOTAL_STEPS = 1e-3, 2480
# Parity runs 3 steps (learning rates 0, lr/2, lr under warm-up) on cfjax's own noise. Losses
# agree to round-off. The updates move weights by up to 1.5e-3; single weights then differ by up
# to ~8e-4 (measured, 4-16 images), always ones with tiny gradients, where Adam's first steps
# m / (sqrt(v) + eps) ~ g / (|g| + eps) turn round-off in g ~ eps into a sizeable fraction of a
# step. So the tight checks are the loss and the gradient (max abs difference relative to the
# largest gradient entry); after the updates no weight may differ by more than one full step and
# the whole update vector must agree within 2% (relative l2).
TOL = {"loss": 1e-4, "grad_rel": 1e-3, "params_after_3_steps": 1.5e-3, "update_rel_l2": 2e-2}
SIZES = (16, 64, 256)
QUICK_SIZES = (8, 32)
HEADLINE = 64


def load(trainable=True):
    import torch

    from cfjax.data import load_dataset
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    params, config, _ = load_flow(default_model_dir("flow", "mnist5k_glow"))
    train = load_dataset("mnist5k", "train")
    return params, config, train, torch


def _cfjax_step(config, train, total_steps):
    from cfjax.pipelines.train_flow import build_spec, make_optimizer

    spec = build_spec(config, train, LR, total_steps, 0)
    return spec.train_step, make_optimizer(LR, total_steps)


def _jax_arrays(params_jax: dict, config) -> list[np.ndarray]:
    """Every parameter that enters the function (flow + class means), in the twin's layout and order."""
    g = config.glow
    out = [np.asarray(params_jax["latent"]["mu"])]
    for lvl in range(g.num_levels):
        lp = jax_np(params_jax["glow"][f"level{lvl}"])
        for i in range(g.steps_per_level):
            out += [lp["actnorm"]["log_scale"][i], lp["actnorm"]["bias"][i], np.tril(lp["conv1x1"]["lower"][i], -1),
                    np.triu(lp["conv1x1"]["upper"][i], 1), lp["conv1x1"]["log_abs_s"][i]]
            for j in (1, 2):
                out += [np.transpose(lp["coupling"][f"conv{j}"]["w"][i], (3, 2, 0, 1)), lp["coupling"][f"conv{j}"]["b"][i]]
            w3, b3 = lp["coupling"]["conv3"]["w"][i], lp["coupling"]["conv3"]["b"][i]
            cb = w3.shape[-1] // 2
            out += [np.transpose(np.concatenate([w3[..., cb:], w3[..., :cb]], -1), (3, 2, 0, 1)), np.concatenate([b3[cb:], b3[:cb]])]
    return out


def jax_np(tree):
    import jax

    return jax.tree_util.tree_map(np.asarray, tree)


def _twin_arrays(twin, grad: bool = False) -> list[np.ndarray]:
    """The twin's parameters (or their gradients) in the order of :func:`_jax_arrays`."""
    import FrEIA.modules as Fm

    from benchmarks.twins.flow import LUConv1x1

    def t(p):
        a = p.grad if grad else p
        return np.zeros(tuple(p.shape), np.float32) if a is None else a.detach().numpy().copy()

    out = [t(twin.mu)]
    mods = [m for m in twin.inn.module_list if not isinstance(m, Fm.HaarDownsampling)]
    for an, lu, cp in zip(mods[0::3], mods[1::3], mods[2::3]):
        assert isinstance(an, Fm.ActNorm) and isinstance(lu, LUConv1x1)
        out += [t(an.scale).ravel(), t(an.bias).ravel(), np.tril(t(lu.lower), -1), np.triu(t(lu.upper), 1), t(lu.log_abs_s)]
        for conv in (cp.subnet[0], cp.subnet[2], cp.subnet[4]):
            out += [t(conv.weight), t(conv.bias)]
    return out


def parity(n: int = 16, loaded=None, steps: int = 3) -> dict:
    """Losses of ``steps`` updates and every parameter after them; AssertionError beyond TOL."""
    import jax
    import jax.numpy as jnp

    from benchmarks.twins.flow import TwinFlowClassifier, TwinTrainer
    from cfjax.models import flow_classifier as fc

    params, config, train, torch = loaded or load()
    total = 20  # warm-up of 2 steps: the 3 steps see learning rates 0, lr/2, lr
    train_step, opt = _cfjax_step(config, train, total)
    twin = TwinFlowClassifier(params, config, trainable=True)
    trainer = TwinTrainer(twin, LR, total)
    state = {"params": params, "opt_state": opt.init(params)}
    x, y = train.images[:n], train.labels[:n]
    # The gradient of the loss at the starting weights, on cfjax's own noise.
    key0 = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    g_jax = jax.grad(lambda p: fc.loss_fn(p, config, jnp.asarray(x), jnp.asarray(y), key0)[0])(params)
    from benchmarks.twins.flow import ib_loss

    probe = TwinFlowClassifier(params, config, trainable=True)
    xn0 = np.array(fc.dequantize(key0, config, jnp.asarray(x)))
    z0, ld0 = probe.encode(torch.as_tensor(xn0).permute(0, 3, 1, 2).contiguous())
    ib_loss(probe, z0, ld0, torch.as_tensor(y).long())[0].backward()
    gj, gt = _jax_arrays(jax.device_get(g_jax), config), _twin_arrays(probe, grad=True)
    g_scale = max(float(np.abs(a).max()) for a in gj)
    grad_rel = max(float(np.abs(a - b).max()) for a, b in zip(gj, gt)) / g_scale
    losses = []
    for s in range(steps):
        key = jax.random.fold_in(jax.random.PRNGKey(0), s)
        xn = np.array(fc.dequantize(key, config, jnp.asarray(x)))
        state, m = train_step(state, x, y, key)
        lt = trainer.step(torch.as_tensor(xn).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y).long(), noise=False)
        losses.append(abs(float(m["loss"]) - float(lt)))
    before = _jax_arrays(params, config)
    after = _jax_arrays(jax.device_get(state["params"]), config)
    after_t = _twin_arrays(twin)
    upd = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    upd_t = np.concatenate([(a - b).ravel() for a, b in zip(after_t, before)])
    d = {"n": n, "steps": steps, "loss": max(losses), "grad_rel": grad_rel, "grad_max_abs": g_scale,
         "params_after_3_steps": float(max(np.abs(a - b).max() for a, b in zip(after, after_t))),
         "update_rel_l2": float(np.linalg.norm(upd - upd_t) / np.linalg.norm(upd)),
         "param_change": float(np.abs(upd).max())}
    bad = [k for k in TOL if not d[k] <= TOL[k]]
    if d["param_change"] < TOL["params_after_3_steps"]:
        bad.append("param_change (the updates must move the weights well beyond the tolerance)")
    if bad:
        raise AssertionError(f"training twin parity failed ({', '.join(bad)}): {d} vs tolerances {TOL}")
    return d


def run(quick: bool = False, budget_s: float = 150.0, repeats: int | None = None, sizes: tuple | None = None, log=print) -> dict:
    import jax

    from benchmarks import roofline
    from benchmarks.twins.flow import TwinFlowClassifier, TwinTrainer

    res = common.base_result("train_flow", quick)
    loaded = load()
    params, config, train, torch = loaded
    res["parity"] = parity(8 if quick else 16, loaded)
    res["tolerances"] = TOL
    log(f"train_flow parity ok: {res['parity']}")
    train_step, opt = _cfjax_step(config, train, TOTAL_STEPS)
    sizes = tuple(sizes) if sizes else (QUICK_SIZES if quick else SIZES)
    reps = repeats or (3 if quick else 7)
    rows, prev = [], None
    head_fns = None
    dev = res["twin_device"] = common.twin_device()
    gen = torch.Generator(device=dev).manual_seed(0)
    for b in sizes:
        skip = common.budget_skip(prev, b, reps, budget_s, 6)
        if skip is not None:
            rows.append(skip)
            log(f"train_flow batch {b}: skipped ({skip['reason']})")
            continue
        x, y = train.images[:b], train.labels[:b]
        xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous().to(dev)
        yt = torch.as_tensor(y).long().to(dev)
        holder = {"state": {"params": params, "opt_state": opt.init(params)}, "step": 0}
        with common.twin_context(dev):
            twin = TwinFlowClassifier(params, config, trainable=True)
            trainer = TwinTrainer(twin, LR, TOTAL_STEPS)

        def f_jax(holder=holder, x=x, y=y):  # bound: kept for the roofline
            key = jax.random.fold_in(jax.random.PRNGKey(0), holder["step"])
            holder["state"], m = train_step(holder["state"], x, y, key)
            holder["step"] += 1
            jax.block_until_ready((holder["state"], m))

        f_torch = common.on_twin_device(lambda trainer=trainer, xt=xt, yt=yt: trainer.step(xt, yt, noise=True, generator=gen), dev)  # noqa: E731
        row = common.time_pair(b, f_jax, f_torch, reps, b, "images_per_s", b == (HEADLINE if HEADLINE in sizes else sizes[-1]), True)
        if b == (HEADLINE if HEADLINE in sizes else sizes[-1]):
            head_fns = {"cfjax": f_jax, "twin": f_torch}
        tj, tw = row["cfjax_s"], row["twin_s"]
        rows.append(row)
        prev = row
        log(f"train_flow batch {b}: cfjax {b / tj:.0f} img/s, twin {b / tw:.0f} img/s, speedup {tw / tj:.2f}x")
    common.set_headline(res, rows, HEADLINE if HEADLINE in sizes else sizes[-1], 2.0)
    state0 = {"params": params, "opt_state": opt.init(params)}
    key0 = jax.random.PRNGKey(0)

    def step_args(b):
        return state0, np.asarray(train.images[:b]), np.asarray(train.labels[:b]), key0

    roofline.attach(res, lambda b: roofline.jaxpr_flops(train_step, *step_args(b)),
                    xla_at=lambda b: roofline.xla_flops(train_step, *step_args(b)), log=log, headline_fns=head_fns)
    res["settings"] = {"model": "cfjax/pretrained/mnist5k_glow_flow (starting weights)", "lr": LR, "total_steps_schedule": TOTAL_STEPS,
                       "repeats": reps, "timing": "median of interleaved single steps after two warm-up steps",
                       "cfjax": "cfjax.pipelines.train_flow.build_spec(...).train_step (jit; no buffer donation)",
                       "twin": "FrEIA SequenceINN with a plain-torch LU 1x1 conv, torch eager, AdamW + Adam, clip_grad_norm_",
                       "memory": "peak_rss_mb: extra host RSS high-water (VmHWM after resetting it) during one step at the headline batch"}
    common.stamp_end(res)
    return res


plot = partial(common.plot_throughput, x_key="batch", y_key="images_per_s", xlabel="training batch size", ylabel="training images / s")
