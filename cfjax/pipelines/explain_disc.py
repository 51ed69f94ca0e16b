"""DISC counterfactuals for a BatchNorm classifier by deep model inversion (``cfjax explain disc``).

Defaults (``cfjax.methods.disc.DISCConfig()`` and ``--manifold duq``) were chosen by
``examples/disc_ablation.py``; see ``examples/results/disc_ablation.md``. The queries run in
compiled chunks of ``--batch-size`` (one progress-bar step per chunk). Writes the CF.npz contract
(x, x_cf, y, y_pred, y_target, y_cf_pred, p_pred, p_cf, success, trajectory when progressive,
method="disc", seconds).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.batching import map_chunks
from cfjax.validation import positive_int, validate_images, validate_targets
from cfjax.errors import CfjaxError
from cfjax.methods import disc
from cfjax.pipelines.explain_common import (
    Output,
    Queries,
    check_picture,
    check_target_spec,
    check_writable,
    load_queries,
    open_queries,
    process_layout,
    resolve_model_dir,
    resolve_targets,
    save_npz_atomic,
    target_header,
    targets_for,
    wants_shards,
)
from cfjax.pipelines.progress import progress_bar, reporter
from cfjax.pipelines.sharding import batch_mesh, mesh_size, replicate, round_batch, shard_batch

MANIFOLDS = ("duq", "none")
DEFAULT_MANIFOLD = "duq"
DEFAULT_SHARD_SIZE = 256  # DISC is an optimisation per query: smaller shards lose less to a kill


def duq_from_dir(model_dir) -> tuple:
    """``(log_kernel_fn, variables)`` for :func:`cfjax.methods.disc.generate` from a DUQ model dir."""
    from cfjax import model_dirs
    from cfjax.models.duq import duq_log_kernel

    m = model_dirs.load("duq", model_dir)
    variables, config = m.params, m.config

    def log_kernel_fn(v, x):
        return duq_log_kernel(v, config, x)

    return log_kernel_fn, variables


def predict_proba_batched(apply_fn, variables, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Classifier probabilities (N, C) of images (N, H, W, C), in chunks."""
    return map_chunks(lambda xb: disc.predict_proba(apply_fn, variables, xb), (x,), batch_size, pad=False)


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
    batch_size = positive_int(batch_size, "batch_size")
    base = jax.random.key(config.seed if seed is None else seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n) + int(index_offset))
    mesh = batch_mesh(devices)
    pad_ok = config.bn_convention == "image"  # padding would change joint batch statistics
    bs = round_batch(batch_size if (pad_batch and pad_ok) else min(batch_size, n), mesh)
    variables = replicate(variables, mesh)
    if duq is not None:
        duq = (duq[0], replicate(duq[1], mesh))

    def chunk(xb, tb, kb):
        cm = mesh if len(xb) % mesh_size(mesh) == 0 else None  # an unpadded joint batch may not split evenly
        out = disc.generate(apply_fn, variables, shard_batch(xb, cm), shard_batch(tb, cm), config, duq=duq, key=shard_batch(kb, cm))
        return {k: v for k, v in out.items() if k != "probs_cf"}

    with progress_bar(n, "explain disc", disable=quiet) as bar:
        res = map_chunks(chunk, (x, np.asarray(targets, np.int32), keys), bs, pad=pad_ok,
                         axis1=("trajectory", "stage_success"), on_chunk=reporter(bar, on_batch))
    for k in ("y_pred", "y_target", "y_cf_pred"):
        res[k] = res[k].astype(np.int32)
    return res


# Datasets of handwriting on a black page: DISC's "strokes" style is their default (disc.STYLES).
STROKE_DATASETS = ("mnist5k", "mnist", "emnist", "kmnist")


def default_style(data: str, model: str | None = None) -> str:
    """The DISC style (:data:`cfjax.methods.disc.STYLES`) ``cfjax explain disc`` uses unless told:
    "strokes" for the handwriting datasets (:data:`STROKE_DATASETS`) and for an .npz of queries
    explained with the shipped mnist5k classifier, "plain" for anything else."""
    if data in STROKE_DATASETS:
        return "strokes"
    return "strokes" if str(data).endswith(".npz") and model in STROKE_DATASETS else "plain"


def _load_models(queries: Queries, manifold: str, duq_dir, image_shape):
    """(model_dir, apply_fn, variables, classifier config, duq pair or None, duq_dir)."""
    from cfjax import model_dirs
    from cfjax.pretrained import default_model_dir

    model_dir = resolve_model_dir(queries, "classifier")
    clf = model_dirs.load("classifier", model_dir)
    duq = None
    if manifold == "duq":
        duq_dir = duq_dir or default_model_dir("duq", queries.data)
        duq = duq_from_dir(duq_dir)
    else:
        duq_dir = None
    if tuple(image_shape) != clf.image_shape:
        raise CfjaxError(f"--data {queries.data} images are {tuple(image_shape)} but the model {model_dir} expects {clf.image_shape}")
    return model_dir, clf.apply, clf.params, clf.config, duq, duq_dir


def _targets(apply_fn, variables, x, target, num_classes: int, batch_size: int) -> np.ndarray:
    """The (N,) target classes of queries x: per-query targets as given, or 'next'/K resolved
    against the classifier's predictions."""
    if isinstance(target, np.ndarray):
        return validate_targets(target, num_classes, len(x))
    y_pred = np.argmax(predict_proba_batched(apply_fn, variables, x, batch_size), -1).astype(np.int32)
    return validate_targets(resolve_targets(target, y_pred, num_classes), num_classes, len(x))


def explain(queries: Queries, output: Output, config: disc.DISCConfig = disc.DISCConfig(), *,
            manifold: str = DEFAULT_MANIFOLD, duq_dir=None, batch_size: int = 256, devices: int | None = 0,
            seed: int = 0, quiet: bool = False) -> int:
    """Explain ``queries`` with the classifier they name (and DUQ for ``manifold="duq"``) and
    write ``output``. Everything that can be checked is checked before any work; nothing is
    written on error."""
    if manifold not in MANIFOLDS:
        raise CfjaxError(f"unknown manifold {manifold!r}: choose one of {', '.join(MANIFOLDS)}")
    positive_int(batch_size, "batch_size")
    settings = dict(manifold=manifold, duq_dir=duq_dir, batch_size=batch_size, devices=devices, seed=seed, quiet=quiet)
    if wants_shards(output):
        return _explain_sharded(queries, output, config, **settings)
    check_writable(output.out)
    if output.png:
        check_picture(output.png, output.out)
    check_target_spec(queries.target)  # the format; the range needs the model
    queries_ds = load_queries(queries)  # first: an unknown dataset or a bad file is named as such
    model_dir, apply_fn, variables, cconfig, duq, _ = _load_models(queries, manifold, duq_dir, queries_ds.image_shape)
    x = validate_images(queries_ds.images, tuple(cconfig.image_shape), f"--data {queries.data} images")
    t0 = time.perf_counter()
    target = targets_for(queries.target, len(x), cconfig.num_classes)
    targets = _targets(apply_fn, variables, x, target, cconfig.num_classes, batch_size)
    res = explain_arrays(apply_fn, variables, x, targets, config, duq, batch_size, seed, quiet=quiet, devices=devices)
    seconds = time.perf_counter() - t0
    traj = res.pop("trajectory")
    stage_success = res.pop("stage_success")
    extra = {"trajectory": traj, "stage_success": stage_success} if config.progressive else {}
    save_npz_atomic(
        output.out, x=x, y=queries_ds.labels, method=np.array("disc"), model=np.array(str(model_dir)),
        seconds=np.float32(seconds), **res, **extra,
    )
    flip = float(np.mean(res["y_cf_pred"] == res["y_target"]))
    priors = "".join(f", {name} {w:g}" for name, w in (("ink", config.lambda_ink), ("keep-ink", config.lambda_keep),
                                                         ("frame", config.lambda_frame)) if w > 0)
    print(f"DISC ({config.prior}, manifold {manifold}, {'progressive' if config.progressive else 'one stage'}, {config.steps} steps{priors}): "
          f"{len(x)} counterfactuals in {seconds:.1f}s ({seconds / len(x):.2f} s each, compile included, "
          f"{mesh_size(batch_mesh(devices))} device(s)); "
          f"flip rate {flip:.4f} -> {output.out}")
    if output.png:
        from cfjax.plotting import save_counterfactual_grid

        save_counterfactual_grid(
            output.png, x, res["x_cf"], res["y_pred"], res["y_target"], res["y_cf_pred"],
            p_pred=res["p_pred"], p_cf=res["p_cf"],
            title=f"DISC on {queries_ds.name}/{queries_ds.split}: flip rate {flip:.1%}",
        )
        print(f"grid -> {output.png}")
    return 0


def _explain_sharded(queries: Queries, output: Output, config: disc.DISCConfig, *, manifold, duq_dir, batch_size,
                     devices, seed, quiet) -> int:
    """Stream the split in shards of ``output.shard_size`` queries into the directory ``output.out``.

    A query's random key is fold_in(key(seed), its index in the split), so its result does not
    depend on the shard it falls in; the manifest pins the batch size, shard size and devices,
    so a resumed run repeats the chunking of an uninterrupted one exactly.
    """
    import dataclasses

    from cfjax.pipelines import shards as sh

    if output.png:
        raise CfjaxError("--png draws one grid from one CF.npz; with --shards, plot a shard instead")
    pi, pc = process_layout(output)
    check_target_spec(queries.target)
    reader, n = open_queries(queries)
    model_dir, apply_fn, variables, cconfig, duq, duq_dir = _load_models(queries, manifold, duq_dir, reader.image_shape)
    target = targets_for(queries.target, n, cconfig.num_classes)  # validates the targets before any work
    ndev = mesh_size(batch_mesh(devices))
    header = {
        "method": "disc", "model": str(model_dir), "data": queries.data, "split": queries.split, "data_dir": queries.data_dir,
        "limit": str(queries.limit), "target": target_header(queries.target),
        "settings": {"disc": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
                     "manifold": manifold, "duq": None if duq_dir is None else str(duq_dir),
                     "batch_size": batch_size, "devices": ndev, "seed": seed},
    }
    run = sh.open_run(output.out, header, n, output.shard_size, output.resume, pi, pc, log=print)

    def compute(start, stop, advance):
        x, y = reader.read(start, stop)
        x = validate_images(x, tuple(cconfig.image_shape), f"--data {queries.data} images")
        t = target[start:stop] if isinstance(target, np.ndarray) else target
        targets = _targets(apply_fn, variables, x, t, cconfig.num_classes, batch_size)
        res = explain_arrays(apply_fn, variables, x, targets, config, duq, batch_size, seed, quiet=True,
                             devices=devices, index_offset=start, pad_batch=True, on_batch=advance)
        traj, stage_success = res.pop("trajectory"), res.pop("stage_success")
        extra = {"trajectory": traj, "stage_success": stage_success} if config.progressive else {}
        return {"x": x, "y": y, "method": np.array("disc"), "model": np.array(str(model_dir)), **res, **extra}

    def summary(arrays):
        return {"flip_rate": round(float(np.mean(arrays["y_cf_pred"] == arrays["y_target"])), 6)}

    sh.run_and_report(run, compute, "explain disc", quiet, summary, "flip_rate", output.out)
    return 0
