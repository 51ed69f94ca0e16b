"""DISC counterfactuals for a BatchNorm classifier by deep model inversion.

    cfjax explain disc [--model DIR] --data mnist5k --split test --limit N --target next|K \
        --out CF.npz [--png GRID.png] [--steps S] [--prior pixels|dip|inr] [--manifold duq|none] \
        [--duq DIR] [--bn-weight W] [--progressive|--no-progressive] [--batch-size B] [--seed S]

Defaults (``cfjax.methods.disc.DISCConfig()`` and ``--manifold duq``) were chosen by
``examples/disc_ablation.py``; see ``examples/results/disc_ablation.md``. The queries run in
compiled chunks of ``--batch-size`` (one progress-bar step per chunk). Writes the CF.npz contract
(x, x_cf, y, y_pred, y_target, y_cf_pred, p_pred, p_cf, success, trajectory when progressive,
method="disc", seconds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.data import validate_images, validate_targets
from cfjax.errors import CfjaxError
from cfjax.methods import disc
from cfjax.pipelines.explain_common import (
    add_explain_arguments,
    add_shard_arguments,
    check_picture,
    check_writable,
    resolve_model_dir,
    target_file,
    target_header,
    targets_for,
    load_queries,
    open_queries,
    process_layout,
    resolve_targets,
    save_npz_atomic,
    wants_shards,
)
from cfjax.pipelines.progress import progress_bar
from cfjax.pipelines.sharding import batch_mesh, mesh_size, replicate, round_batch, shard_batch

XLA_WORKLOAD = "disc"  # XLA:CPU flags the cli applies for this command (cfjax.xla_cpu): none, measured slower

MANIFOLDS = ("duq", "none")
DEFAULT_MANIFOLD = "duq"
DEFAULT_SHARD_SIZE = 256  # DISC is an optimisation per query: smaller shards lose less to a kill


def duq_from_dir(model_dir) -> tuple:
    """``(log_kernel_fn, variables)`` for :func:`cfjax.methods.disc.generate` from a DUQ model dir."""
    from cfjax.models.duq import duq_log_kernel
    from cfjax.pipelines.train_duq import load_duq

    variables, config, _ = load_duq(model_dir)

    def log_kernel_fn(v, x):
        return duq_log_kernel(v, config, x)

    return log_kernel_fn, variables


def predict_proba_batched(apply_fn, variables, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Classifier probabilities (N, C) of images (N, H, W, C), in chunks."""
    return np.concatenate([np.asarray(disc.predict_proba(apply_fn, variables, x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def explain_arrays(
    apply_fn,
    variables,
    x: np.ndarray,
    targets: np.ndarray,
    config: disc.DISCConfig,
    duq: tuple | None = None,
    batch_size: int = 256,
    seed: int | None = None,
    quiet: bool = True,
    devices: int | None = 1,
    index_offset: int = 0,
    pad_batch: bool = False,
    on_batch=None,
) -> dict:
    """:func:`cfjax.methods.disc.generate` over chunks of ``batch_size`` queries, with a progress bar.

    x (N, H, W, C) in [0, 1], targets (N,) ints. Every query gets its own random key
    fold_in(key(seed), index_offset + i) (seed default ``config.seed``; i its index here), so a
    query's key depends only on its index in the whole split, not on the chunk or shard it runs
    in (under ``bn_convention="batch"`` a chunk is one jointly optimised batch, so there the
    chunking matters). Each chunk is sharded over ``devices`` local devices (None/0: all; see
    cfjax.pipelines.sharding; the classifier and DUQ variables are replicated). ``pad_batch``
    pads even when N < batch_size (one compiled shape across the calls of a sharded run);
    ``on_batch(m)`` is called after each chunk of m queries.
    Returns NumPy arrays: x_cf, trajectory (S, N, ...), success, y_pred, p_pred, y_target,
    y_cf_pred, p_cf, fit_mse.
    """
    x = validate_images(x, None, "queries")
    n = len(x)
    if batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {batch_size}")
    base = jax.random.key(config.seed if seed is None else seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n) + int(index_offset))
    mesh = batch_mesh(devices)
    pad_ok = config.bn_convention == "image"  # padding would change joint batch statistics
    bs = round_batch(batch_size if (pad_batch and pad_ok) else min(batch_size, n), mesh)
    variables = replicate(variables, mesh)
    if duq is not None:
        duq = (duq[0], replicate(duq[1], mesh))
    outs = []
    with progress_bar(n, "explain disc", disable=quiet) as bar:
        for i in range(0, n, bs):
            xb, tb, kb = x[i : i + bs], np.asarray(targets[i : i + bs], np.int32), keys[i : i + bs]
            m = len(xb)
            if m < bs and pad_ok:  # pad to the compiled shape
                xb = np.concatenate([xb, np.repeat(xb[-1:], bs - m, 0)])
                tb = np.concatenate([tb, np.repeat(tb[-1:], bs - m, 0)])
                kb = jnp.concatenate([kb, jnp.repeat(kb[-1:], bs - m, 0)])
            cm = mesh if len(xb) % mesh_size(mesh) == 0 else None  # an unpadded joint batch may not split evenly
            out = disc.generate(apply_fn, variables, shard_batch(xb, cm), shard_batch(tb, cm), config, duq=duq, key=shard_batch(kb, cm))
            out = {k: np.asarray(v) for k, v in out.items() if k != "probs_cf"}
            outs.append({k: (v[:, :m] if k in ("trajectory", "stage_success") else v[:m]) for k, v in out.items()})
            bar.update(i + m)
            if on_batch is not None:
                on_batch(m)
    res = {k: np.concatenate([o[k] for o in outs], axis=1 if k in ("trajectory", "stage_success") else 0) for k in outs[0]}
    for k in ("y_pred", "y_target", "y_cf_pred"):
        res[k] = res[k].astype(np.int32)
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = disc.DISCConfig()
    add_explain_arguments(p)
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps in all, split over the stages (default {d.steps})")
    p.add_argument("--prior", default=d.prior, help=f"image parametrisation: pixels, dip or inr (default {d.prior})")
    p.add_argument("--fit-steps", type=int, default=d.fit_steps, help=f"steps fitting a dip/inr generator to the query first (default {d.fit_steps})")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the prior's)")
    p.add_argument("--manifold", default=DEFAULT_MANIFOLD, help=f"manifold consistency: duq (DUQ kernel of the target class) or none (default {DEFAULT_MANIFOLD})")
    p.add_argument("--duq", default=None, help="DUQ model directory (default: the shipped one for --data)")
    p.add_argument("--bn-weight", type=float, default=d.lambda_bn, help=f"weight of the BatchNorm-statistics term (default {d.lambda_bn}; 0 for a model without BatchNorm)")
    p.add_argument("--bn-convention", default=d.bn_convention, help=f"BatchNorm statistics per image or per batch (default {d.bn_convention})")
    p.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=d.progressive,
                   help=f"raise the target probability through {', '.join(map(str, d.stages))} with warm starts (default {'on' if d.progressive else 'off'})")
    p.add_argument("--devices", type=int, default=0, help="local devices to shard the batch over (default 0 = all)")
    p.add_argument("--quiet", action="store_true")
    add_shard_arguments(p, DEFAULT_SHARD_SIZE)


def config_from_args(args) -> disc.DISCConfig:
    """The DISCConfig the command line asks for (CfjaxError on a bad value)."""
    if args.manifold not in MANIFOLDS:
        raise CfjaxError(f"unknown --manifold {args.manifold!r}: choose one of {', '.join(MANIFOLDS)}")
    if not isinstance(args.steps, int) or args.steps <= 0:
        raise CfjaxError(f"--steps must be a positive integer, got {args.steps}")
    try:
        return disc.DISCConfig().replace(
            steps=args.steps, prior=args.prior, fit_steps=args.fit_steps, lr=args.lr, lambda_bn=args.bn_weight,
            bn_convention=args.bn_convention, progressive=args.progressive, seed=args.seed,
            lambda_mc=disc.DISCConfig().lambda_mc if args.manifold == "duq" else 0.0,
        )
    except CfjaxError as e:
        raise CfjaxError(str(e).replace("DISC weight lambda_bn", "--bn-weight").replace("DISC steps", "--steps")) from None


def run(args) -> int:
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pretrained import default_model_dir

    # Everything that can be checked is checked before any work; nothing is written on error.
    config = config_from_args(args)
    if args.batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {args.batch_size}")
    if wants_shards(args):
        return run_sharded(args, config)
    check_writable(args.out)
    if args.png:
        check_picture(args.png, args.out)
    if target_file(args.target) is None:
        resolve_targets(args.target, np.zeros(1, np.int32), 1 << 30)  # the format; the range needs the model
    queries = load_queries(args)  # first: an unknown dataset or a bad file is named as such
    model_dir = resolve_model_dir(args, "classifier")
    apply_fn, variables, cconfig, _ = load_classifier(model_dir)
    duq = None
    if args.manifold == "duq":
        duq_dir = args.duq or default_model_dir("duq", args.data)
        duq = duq_from_dir(duq_dir)
    if queries.image_shape != tuple(cconfig.image_shape):
        raise CfjaxError(f"--data {args.data} images are {queries.image_shape} but the model {model_dir} expects {tuple(cconfig.image_shape)}")
    x = validate_images(queries.images, tuple(cconfig.image_shape), f"--data {args.data} images")
    t0 = time.perf_counter()
    target = targets_for(args.target, len(x), cconfig.num_classes)
    y_pred = np.argmax(predict_proba_batched(apply_fn, variables, x, args.batch_size), -1).astype(np.int32)
    targets = target if isinstance(target, np.ndarray) else resolve_targets(target, y_pred, cconfig.num_classes)
    targets = validate_targets(targets, cconfig.num_classes, len(x))
    res = explain_arrays(apply_fn, variables, x, targets, config, duq, args.batch_size, args.seed, quiet=args.quiet, devices=args.devices)
    seconds = time.perf_counter() - t0
    traj = res.pop("trajectory")
    stage_success = res.pop("stage_success")
    extra = {"trajectory": traj, "stage_success": stage_success} if config.progressive else {}
    save_npz_atomic(
        args.out, x=x, y=queries.labels, method=np.array("disc"), model=np.array(str(model_dir)),
        seconds=np.float32(seconds), **res, **extra,
    )
    flip = float(np.mean(res["y_cf_pred"] == res["y_target"]))
    print(f"DISC ({config.prior}, manifold {args.manifold}, {'progressive' if config.progressive else 'one stage'}, {config.steps} steps): "
          f"{len(x)} counterfactuals in {seconds:.1f}s ({seconds / len(x):.2f} s each, compile included); "
          f"flip rate {flip:.4f} -> {args.out}")
    if args.png:
        from cfjax.plotting import save_counterfactual_grid

        save_counterfactual_grid(
            args.png, x, res["x_cf"], res["y_pred"], res["y_target"], res["y_cf_pred"],
            p_pred=res["p_pred"], p_cf=res["p_cf"],
            title=f"DISC on {queries.name}/{queries.split}: flip rate {flip:.1%}",
        )
        print(f"grid -> {args.png}")
    return 0


def run_sharded(args, config: disc.DISCConfig) -> int:
    """``--shards``: stream the split in shards of --shard-size queries into the directory --out.

    A query's random key is fold_in(key(--seed), its index in the split), so its result does
    not depend on the shard it falls in; the manifest pins --batch-size, --shard-size and
    --devices, so a resumed run repeats the chunking of an uninterrupted one exactly.
    """
    import dataclasses

    from cfjax.pipelines import shards as sh
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pretrained import default_model_dir

    if args.png:
        raise CfjaxError("--png draws one grid from one CF.npz; with --shards, plot a shard instead")
    if args.batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {args.batch_size}")
    pi, pc = process_layout(args)
    if target_file(args.target) is None:
        resolve_targets(args.target, np.zeros(1, np.int32), 1 << 30)
    reader, n = open_queries(args)
    model_dir = resolve_model_dir(args, "classifier")
    apply_fn, variables, cconfig, _ = load_classifier(model_dir)
    duq, duq_dir = None, None
    if args.manifold == "duq":
        duq_dir = args.duq or default_model_dir("duq", args.data)
        duq = duq_from_dir(duq_dir)
    if reader.image_shape != tuple(cconfig.image_shape):
        raise CfjaxError(f"--data {args.data} images are {reader.image_shape} but the model {model_dir} expects {tuple(cconfig.image_shape)}")
    target = targets_for(args.target, n, cconfig.num_classes)  # validates --target before any work
    ndev = mesh_size(batch_mesh(args.devices))
    header = {
        "method": "disc", "model": str(model_dir), "data": args.data, "split": args.split, "data_dir": args.data_dir,
        "limit": str(args.limit), "target": target_header(args.target),
        "settings": {"disc": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
                     "manifold": args.manifold, "duq": None if duq_dir is None else str(duq_dir),
                     "batch_size": args.batch_size, "devices": ndev, "seed": args.seed},
    }
    run = sh.open_run(args.out, header, n, args.shard_size, args.resume, pi, pc, log=print)

    def compute(start, stop, advance):
        x, y = reader.read(start, stop)
        x = validate_images(x, tuple(cconfig.image_shape), f"--data {args.data} images")
        y_pred = np.argmax(predict_proba_batched(apply_fn, variables, x, args.batch_size), -1).astype(np.int32)
        t = target[start:stop] if isinstance(target, np.ndarray) else resolve_targets(target, y_pred, cconfig.num_classes)
        targets = validate_targets(t, cconfig.num_classes, len(x))
        res = explain_arrays(apply_fn, variables, x, targets, config, duq, args.batch_size, args.seed, quiet=True,
                             devices=args.devices, index_offset=start, pad_batch=True, on_batch=advance)
        traj, stage_success = res.pop("trajectory"), res.pop("stage_success")
        extra = {"trajectory": traj, "stage_success": stage_success} if config.progressive else {}
        return {"x": x, "y": y, "method": np.array("disc"), "model": np.array(str(model_dir)), **res, **extra}

    def summary(arrays):
        return {"flip_rate": round(float(np.mean(arrays["y_cf_pred"] == arrays["y_target"])), 6)}

    sh.run_and_report(run, compute, "explain disc", args.quiet, summary, "flip_rate", args.out)
    return 0
