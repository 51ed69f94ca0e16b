"""ECINN counterfactuals and ECINNh heatmaps for a dataset split.

    cfjax explain ecinn [--model DIR] --data mnist5k --split test --limit N --target next|K \
        --out CF.npz [--png GRID.png] [--step paper|code|full] [--direction predicted_means|mu]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.data import validate_images, validate_targets
from cfjax.errors import CfjaxError
from cfjax.methods import ecinn
from cfjax.models import flow_classifier as fc
from cfjax.pipelines.explain_common import (
    add_explain_arguments,
    add_shard_arguments,
    check_picture,
    check_writable,
    load_queries,
    resolve_model_dir,
    target_file,
    target_header,
    targets_for,
    open_queries,
    process_layout,
    resolve_targets,
    save_npz_atomic,
    wants_shards,
)
from cfjax.pipelines.progress import progress_bar
from cfjax.pipelines.sharding import batch_mesh, replicate, round_batch, shard_batch

XLA_WORKLOAD = "ecinn"  # XLA:CPU flags the cli applies for this command (cfjax.xla_cpu)


DEFAULT_STEP = "code"    # the authors' rule; measured best with refinement on the IB-INN flow (README)
DEFAULT_REFINE = 2


@partial(jax.jit, static_argnames=("config", "step", "direction", "refine"))
def _explain_batch(params, config, x, target_spec_next: bool, target_k, step="paper", direction="predicted_means", refine=0):
    z, _ = fc.encode(params, config, x)
    probs = jax.nn.softmax(fc.latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test), -1)
    y_pred = jnp.argmax(probs, -1)
    target = jnp.where(target_spec_next, (y_pred + 1) % config.num_classes, target_k)
    out = ecinn.counterfactual_from_latent(params, config, z, y_pred, target, step, direction, refine)
    probs_cf = fc.predict_proba(params, config, out["x_cf"])
    return {
        "x_cf": out["x_cf"],
        "y_pred": y_pred,
        "y_target": target,
        "y_cf_pred": jnp.argmax(probs_cf, -1),
        "p_pred": jnp.max(probs, -1),
        "p_cf": jnp.take_along_axis(probs_cf, target[:, None], -1)[:, 0],
        "heatmap": ecinn.heatmap(x, out["x_cf"]),
        "alpha0": out["alpha0"],
        "alpha": out["alpha"],
        "refine_rounds": out["refine_rounds"],
    }


def explain_arrays(params, config, x: np.ndarray, target="next", step=DEFAULT_STEP, direction="predicted_means", batch_size: int = 256, quiet: bool = True, refine: int = DEFAULT_REFINE, devices: int | None = 1,
                   pad_batch: bool = False, on_batch=None) -> dict:
    """Explain a batch of images (N, H, W, C) in [0, 1]; ``target`` is 'next', an int, or (N,) ints.

    Returns numpy arrays following the CF.npz contract (without x and y) plus alpha0/alpha.
    Runs in compiled chunks of ``batch_size`` (the last chunk is padded, so one shape compiles;
    ``pad_batch`` pads even when N < batch_size, so every call of a sharded run compiles the
    same shape), each sharded over ``devices`` local devices (None/0: all; see
    cfjax.pipelines.sharding). ``on_batch(m)`` is called after each chunk of m queries.
    """
    x = validate_images(x, config.image_shape)
    n = len(x)
    if batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {batch_size}")
    per_query = None
    if isinstance(target, str):
        resolve_targets(target, np.zeros(1, np.int32), config.num_classes)  # validates the spec
        is_next = target.strip().lower() == "next"
        k = 0 if is_next else int(target)
    elif np.ndim(target) == 0:
        is_next, k = False, int(validate_targets(target, config.num_classes))
    else:
        is_next, k = False, 0
        per_query = validate_targets(target, config.num_classes, n)
    ecinn._step_fn(step)
    if refine < 0:
        raise CfjaxError(f"--refine must be >= 0, got {refine}")
    if direction not in ecinn.DIRECTIONS:
        raise CfjaxError(f"unknown --direction {direction!r}: choose one of {', '.join(ecinn.DIRECTIONS)}")
    mesh = batch_mesh(devices)
    bs = round_batch(batch_size if pad_batch else min(batch_size, n), mesh)
    params = replicate(params, mesh)
    outs = []
    with progress_bar(n, "explain ecinn", disable=quiet or n <= bs) as bar:
        bar.update(0, phase="compiling")  # the first batch compiles: say so rather than sit at 0
        for i in range(0, n, bs):
            xb = x[i : i + bs]
            m = len(xb)
            tk = per_query[i : i + bs] if per_query is not None else np.full(m, k, np.int32)
            if m < bs:  # pad to the compiled (and evenly shardable) shape
                xb = np.concatenate([xb, np.repeat(xb[-1:], bs - m, 0)])
                tk = np.concatenate([tk, np.repeat(tk[-1:], bs - m, 0)])
            out = _explain_batch(params, config, shard_batch(xb, mesh), is_next, shard_batch(tk, mesh), step, direction, int(refine))
            outs.append({kk: np.asarray(v)[:m] for kk, v in out.items()})
            bar.update(i + m, phase="running")
            if on_batch is not None:
                on_batch(m)
    res = {kk: np.concatenate([o[kk] for o in outs]) for kk in outs[0]}
    for kk in ("y_pred", "y_target", "y_cf_pred"):
        res[kk] = res[kk].astype(np.int32)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_explain_arguments(p)
    p.add_argument("--step", default=DEFAULT_STEP, help=f"alpha as a function of the boundary step alpha0: paper (a0 + 0.8(1 - a0)), code (0.8 + 0.5 a0), short (a0 + 0.3(1 - a0)), full (1), boundary (a0), or a number (default {DEFAULT_STEP})")
    p.add_argument("--refine", type=int, default=DEFAULT_REFINE, help=f"validity refinement rounds for counterfactuals that clipping to [0, 1] turned back (default {DEFAULT_REFINE}; 0 with --step paper is the paper's exact two-pass method)")
    p.add_argument("--direction", default="predicted_means", choices=ecinn.DIRECTIONS,
                   help="translation direction: predicted_means (m_q - m_p, mean latents of the training images predicted as each class; the paper, default) or mu (learned means)")
    p.add_argument("--devices", type=int, default=0, help="local devices to shard the batch over (default 0 = all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_shard_arguments(p, 1024)


def _parse_step(s: str):
    try:
        return float(s)
    except ValueError:
        return s


def _check_options(args) -> object:
    """The settings that need no model, checked before any load; returns the parsed step."""
    if args.batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {args.batch_size}")
    if args.refine < 0:
        raise CfjaxError(f"--refine must be >= 0, got {args.refine}")
    step = _parse_step(args.step)
    if isinstance(step, float) and not np.isfinite(step):
        raise CfjaxError(f"--step must be a rule name or a finite number, got {args.step!r}")
    ecinn._step_fn(step)
    if args.direction not in ecinn.DIRECTIONS:
        raise CfjaxError(f"unknown --direction {args.direction!r}: choose one of {', '.join(ecinn.DIRECTIONS)}")
    if target_file(args.target) is None:
        resolve_targets(args.target, np.zeros(1, np.int32), 1 << 30)  # the format; the range needs the model
    return step


def _validity_line(res: dict) -> tuple[float, str]:
    """Validity counts a counterfactual only when the target differs from the model's prediction."""
    same = res["y_pred"] == res["y_target"]
    validity = float(np.mean((res["y_cf_pred"] == res["y_target"]) & ~same))
    note = f" ({int(same.sum())} target(s) equal to the prediction, not counted as valid)" if same.any() else ""
    return validity, note


def run(args) -> int:
    from cfjax.pipelines.train_flow import load_flow

    if wants_shards(args):
        return run_sharded(args)
    check_writable(args.out)
    if args.png:
        check_picture(args.png, args.out)
    step = _check_options(args)
    queries = load_queries(args)  # first: an unknown dataset is named as such
    model_dir = resolve_model_dir(args, "flow")
    params, config, info = load_flow(model_dir)
    if queries.image_shape != config.image_shape:
        raise CfjaxError(f"--data {args.data} images are {queries.image_shape} but the model {model_dir} expects {config.image_shape}")
    target = targets_for(args.target, len(queries), config.num_classes)
    t0 = time.perf_counter()
    res = explain_arrays(params, config, queries.images, target, step, args.direction, args.batch_size, quiet=args.quiet, refine=args.refine, devices=args.devices)
    seconds = time.perf_counter() - t0
    save_npz_atomic(
        args.out, x=queries.images, y=queries.labels, method=np.array("ecinn"), model=np.array(str(model_dir)),
        seconds=np.float32(seconds), **res,
    )
    validity, note = _validity_line(res)
    print(f"ECINN: {len(queries)} counterfactuals in {seconds:.2f}s ({1000 * seconds / len(queries):.2f} ms each, compile included); "
          f"validity {validity:.4f}{note} -> {args.out}")
    if args.png:
        from cfjax.plotting import save_counterfactual_grid

        save_counterfactual_grid(
            args.png, queries.images, res["x_cf"], res["y_pred"], res["y_target"], res["y_cf_pred"],
            heatmap=res["heatmap"], p_pred=res["p_pred"], p_cf=res["p_cf"],
            title=f"ECINN on {queries.name}/{queries.split}: validity {validity:.1%}",
        )
        print(f"grid -> {args.png}")
    return 0


def _validity(arrays: dict) -> dict:
    return {"validity": round(float(np.mean(arrays["y_cf_pred"] == arrays["y_target"])), 6)}


def run_sharded(args) -> int:
    """``--shards``: stream the split in shards of --shard-size queries into the directory --out."""
    from cfjax.pipelines import shards as sh
    from cfjax.pipelines.sharding import batch_mesh, mesh_size
    from cfjax.pipelines.train_flow import load_flow

    if args.png:
        raise CfjaxError("--png draws one grid from one CF.npz; with --shards, plot a shard instead")
    step = _check_options(args)
    pi, pc = process_layout(args)
    reader, n = open_queries(args)
    model_dir = resolve_model_dir(args, "flow")
    params, config, info = load_flow(model_dir)
    if reader.image_shape != config.image_shape:
        raise CfjaxError(f"--data {args.data} images are {reader.image_shape} but the model {model_dir} expects {config.image_shape}")
    target = targets_for(args.target, n, config.num_classes)  # validates --target before any work
    ndev = mesh_size(batch_mesh(args.devices))
    header = {
        "method": "ecinn", "model": str(model_dir), "data": args.data, "split": args.split, "data_dir": args.data_dir,
        "limit": str(args.limit), "target": target_header(args.target),
        "settings": {"step": args.step, "refine": args.refine, "direction": args.direction,
                     "batch_size": args.batch_size, "devices": ndev, "seed": args.seed},
    }
    run = sh.open_run(args.out, header, n, args.shard_size, args.resume, pi, pc, log=print)

    def compute(start, stop, advance):
        x, y = reader.read(start, stop)
        t = target[start:stop] if isinstance(target, np.ndarray) else target
        res = explain_arrays(params, config, x, t, step, args.direction, args.batch_size, quiet=True,
                             refine=args.refine, devices=args.devices, pad_batch=True, on_batch=advance)
        return {"x": x, "y": y, "method": np.array("ecinn"), "model": np.array(str(model_dir)), **res}

    sh.run_and_report(run, compute, "explain ecinn", args.quiet, _validity, "validity", args.out)
    return 0
