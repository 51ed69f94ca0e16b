"""ECINN counterfactuals and ECINNh heatmaps for a dataset split (``cfjax explain ecinn``).

:func:`explain_arrays` explains images in memory; :func:`explain` runs a whole
:class:`~cfjax.pipelines.explain_common.Queries` into one CF.npz or a shard directory.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.batching import map_chunks
from cfjax.validation import non_negative_int, positive_int, validate_images, validate_targets
from cfjax.errors import CfjaxError
from cfjax.methods import ecinn
from cfjax.models import flow_classifier as fc
from cfjax.pipelines.explain_common import (
    Output,
    Queries,
    check_picture,
    check_writable,
    load_queries,
    open_queries,
    process_layout,
    resolve_model_dir,
    resolve_targets,
    target_header,
    targets_for,
    save_npz_atomic,
    wants_shards,
)
from cfjax.pipelines.progress import progress_bar, reporter
from cfjax.parallel import per_slice
from cfjax.pipelines.sharding import batch_mesh, replicate, round_batch, shard_batch

# The defaults of the CLI and of cfjax.Explainer: the adaptive search rule (the authors' code rule
# extended where the decode stays in the pixel range) with 2 refinement
# rounds (README compares the rules); the pure method's own defaults are the paper's.
DEFAULT_STEP = "adaptive-wide"
DEFAULT_REFINE = 2
DEFAULT_DIRECTION = "predicted_means"
DEFAULT_RESIDUAL = 1.0  # keep all of the query's offset from its class mean (the paper)


@partial(jax.jit, static_argnames=("config", "step", "direction", "refine", "mesh", "residual"))
def explain_batch(params, config, x, target_spec_next: bool, target_k, step, direction, refine, mesh=None, residual=DEFAULT_RESIDUAL):
    """One compiled batch: x (B, H, W, C); the target is (y_pred + 1) mod C where
    ``target_spec_next``, else ``target_k`` (B,). Returns the CF.npz arrays of the batch.

    With a ``mesh`` (x and target_k split over it along the batch, params replicated), every
    device explains its own slice (:func:`cfjax.parallel.per_slice`): the queries are independent,
    so the program needs no cross-device communication."""
    body = partial(_explain_slice, config=config, step=step, direction=direction, refine=refine, residual=residual)
    return per_slice(body, (False, True, False, True), mesh)(params, x, target_spec_next, target_k)


def _explain_slice(params, x, target_spec_next, target_k, *, config, step, direction, refine, residual=DEFAULT_RESIDUAL):
    z, _ = fc.encode(params, config, x)
    probs = jax.nn.softmax(fc.latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test), -1)
    y_pred = jnp.argmax(probs, -1)
    target = jnp.where(target_spec_next, (y_pred + 1) % config.num_classes, target_k)
    out = ecinn.counterfactual_from_latent(params, config, z, y_pred, target, step, direction, refine, residual)
    probs_cf = out["probs_cf"] if "probs_cf" in out else fc.predict_proba(params, config, out["x_cf"])  # refinement's last check
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


_explain_batch = explain_batch  # the name benchmarks/scaling.py compiles


def explain_arrays(params, config, x: np.ndarray, target="next", step=DEFAULT_STEP, direction=DEFAULT_DIRECTION, batch_size: int = 256, quiet: bool = True, refine: int = DEFAULT_REFINE, devices: int | None = 1,
                   pad_batch: bool = False, on_batch=None, residual: float = DEFAULT_RESIDUAL) -> dict:
    """Explain a batch of images (N, H, W, C) in [0, 1]; ``target`` is 'next', an int, or (N,) ints.

    Returns numpy arrays following the CF.npz contract (without x and y) plus alpha0/alpha.
    Runs in compiled chunks of ``batch_size`` (the last chunk is padded, so one shape compiles;
    ``pad_batch`` pads even when N < batch_size, so every call of a sharded run compiles the
    same shape), each sharded over ``devices`` local devices (None/0: all; see
    cfjax.pipelines.sharding). ``on_batch(m)`` is called after each chunk of m queries.
    ``residual``: see :func:`cfjax.methods.ecinn.latent_step`.
    """
    x = validate_images(x, config.image_shape)
    n = len(x)
    batch_size = positive_int(batch_size, "batch_size")
    refine = non_negative_int(refine, "refine")
    step = ecinn.parse_step(step)
    ecinn.check_direction(direction)
    residual = ecinn.check_residual(residual)
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
    mesh = batch_mesh(devices)
    bs = round_batch(batch_size if pad_batch else min(batch_size, n), mesh)
    params = replicate(params, mesh)
    tk = per_query if per_query is not None else np.full(n, k, np.int32)

    def chunk(xb, tb):  # padded to the compiled (and evenly shardable) shape by map_chunks
        return explain_batch(params, config, shard_batch(xb, mesh), is_next, shard_batch(tb, mesh), step, direction, refine, mesh,
                             residual)

    with progress_bar(n, "explain ecinn", disable=quiet or n <= bs) as bar:
        bar.update(0, phase="compiling")  # the first batch compiles: say so rather than sit at 0
        res = map_chunks(chunk, (x, tk), bs, on_chunk=reporter(bar, on_batch, phase="running"))
    for kk in ("y_pred", "y_target", "y_cf_pred"):
        res[kk] = res[kk].astype(np.int32)
    return res


def _validity_line(res: dict) -> tuple[float, str]:
    """Validity counts a counterfactual only when the target differs from the model's prediction."""
    same = res["y_pred"] == res["y_target"]
    validity = float(np.mean((res["y_cf_pred"] == res["y_target"]) & ~same))
    note = f" ({int(same.sum())} target(s) equal to the prediction, not counted as valid)" if same.any() else ""
    return validity, note


def explain(queries: Queries, output: Output, *, step=DEFAULT_STEP, refine: int = DEFAULT_REFINE,
            direction: str = DEFAULT_DIRECTION, batch_size: int = 256, devices: int | None = 0, seed: int = 0,
            quiet: bool = False, residual: float = DEFAULT_RESIDUAL) -> int:
    """Explain ``queries`` with the flow they name and write ``output`` (a CF.npz, optionally a
    picture grid, or a shard directory). Every setting is checked before the model loads."""
    ecinn.parse_step(step)
    positive_int(batch_size, "batch_size")
    non_negative_int(refine, "refine")
    ecinn.check_direction(direction)
    residual = ecinn.check_residual(residual)
    settings = dict(step=step, refine=refine, direction=direction, batch_size=batch_size, devices=devices, seed=seed, quiet=quiet,
                    residual=residual)
    if wants_shards(output):
        return _explain_sharded(queries, output, **settings)
    check_writable(output.out)
    if output.png:
        check_picture(output.png, output.out)
    queries_ds = load_queries(queries)  # first: an unknown dataset is named as such
    model_dir = resolve_model_dir(queries, "flow")
    params, config = _load_flow(model_dir, queries_ds.image_shape, queries.data)
    target = targets_for(queries.target, len(queries_ds), config.num_classes)
    t0 = time.perf_counter()
    res = explain_arrays(params, config, queries_ds.images, target, step, direction, batch_size, quiet=quiet, refine=refine, devices=devices,
                         residual=residual)
    seconds = time.perf_counter() - t0
    save_npz_atomic(
        output.out, x=queries_ds.images, y=queries_ds.labels, method=np.array("ecinn"), model=np.array(str(model_dir)),
        seconds=np.float32(seconds), **res,
    )
    validity, note = _validity_line(res)
    print(f"ECINN: {len(queries_ds)} counterfactuals in {seconds:.2f}s ({1000 * seconds / len(queries_ds):.2f} ms each, compile included); "
          f"validity {validity:.4f}{note} -> {output.out}")
    if output.png:
        from cfjax.plotting import save_counterfactual_grid

        save_counterfactual_grid(
            output.png, queries_ds.images, res["x_cf"], res["y_pred"], res["y_target"], res["y_cf_pred"],
            heatmap=res["heatmap"], p_pred=res["p_pred"], p_cf=res["p_cf"],
            title=f"ECINN on {queries_ds.name}/{queries_ds.split}: validity {validity:.1%}",
        )
        print(f"grid -> {output.png}")
    return 0


def _load_flow(model_dir, image_shape, data: str):
    """(params, config) of the flow in ``model_dir``, which must take images of ``image_shape``."""
    from cfjax import model_dirs

    m = model_dirs.load("flow", model_dir)
    if tuple(image_shape) != m.config.image_shape:
        raise CfjaxError(f"--data {data} images are {tuple(image_shape)} but the model {model_dir} expects {m.config.image_shape}")
    return m.params, m.config


def _validity(arrays: dict) -> dict:
    return {"validity": round(float(np.mean(arrays["y_cf_pred"] == arrays["y_target"])), 6)}


def _explain_sharded(queries: Queries, output: Output, *, step, refine, direction, batch_size, devices, seed, quiet,
                     residual=DEFAULT_RESIDUAL) -> int:
    """Stream the split in shards of ``output.shard_size`` queries into the directory ``output.out``."""
    from cfjax.pipelines import shards as sh
    from cfjax.pipelines.sharding import mesh_size

    if output.png:
        raise CfjaxError("--png draws one grid from one CF.npz; with --shards, plot a shard instead")
    pi, pc = process_layout(output)
    reader, n = open_queries(queries)
    model_dir = resolve_model_dir(queries, "flow")
    params, config = _load_flow(model_dir, reader.image_shape, queries.data)
    target = targets_for(queries.target, n, config.num_classes)  # validates the targets before any work
    ndev = mesh_size(batch_mesh(devices))
    settings: dict = {"step": step, "refine": refine, "direction": direction, "batch_size": batch_size, "devices": ndev, "seed": seed}
    if residual != DEFAULT_RESIDUAL:  # manifests of runs with the paper's move stay as they were
        settings["residual"] = residual
    header = {
        "method": "ecinn", "model": str(model_dir), "data": queries.data, "split": queries.split, "data_dir": queries.data_dir,
        "limit": str(queries.limit), "target": target_header(queries.target),
        "settings": settings,
    }
    run = sh.open_run(output.out, header, n, output.shard_size, output.resume, pi, pc, log=print)

    def compute(start, stop, advance):
        x, y = reader.read(start, stop)
        t = target[start:stop] if isinstance(target, np.ndarray) else target
        res = explain_arrays(params, config, x, t, step, direction, batch_size, quiet=True,
                             refine=refine, devices=devices, pad_batch=True, on_batch=advance, residual=residual)
        return {"x": x, "y": y, "method": np.array("ecinn"), "model": np.array(str(model_dir)), **res}

    sh.run_and_report(run, compute, "explain ecinn", quiet, _validity, "validity", output.out)
    return 0
