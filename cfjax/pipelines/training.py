"""One training loop for every model cfjax trains (flow, classifier, DUQ).

A trainer supplies pure, jitted functions; this module owns the side effects: shuffling,
batching, the progress bar, periodic Orbax checkpoints, ``--resume`` and the final evaluation.

Determinism: epoch ``e`` visits the training set in the order ``default_rng(seed + e)`` gives,
and step ``s`` uses the key ``fold_in(PRNGKey(seed), s)``. A resumed run therefore continues the
exact sequence of an uninterrupted one, mid-epoch included.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import checkpoint as ckpt
from cfjax.data import Dataset
from cfjax.errors import CfjaxError
from cfjax.pipelines.progress import progress_bar

# (state, x (B,H,W,C), y (B,), key) -> (state, metrics: dict[str, scalar])
TrainStep = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[Any, dict]]
# (state, dataset) -> dict[str, float]
EvalFn = Callable[[Any, Dataset], dict]


@dataclass
class TrainSpec:
    """What a trainer hands to :func:`fit`."""

    kind: str                       # "flow", "classifier", "duq", ...
    config: dict                    # JSON-safe model config (rebuilds the model)
    init_state: Callable[[], Any]   # () -> state pytree (params, opt_state, ...)
    train_step: TrainStep
    evaluate: EvalFn
    finalize: Callable[[Any, Dataset], Any] | None = None  # e.g. compute class-mean latents
    info: dict = field(default_factory=dict)  # extra fields for cfjax_model.json
    show: tuple[str, ...] = ("loss",)          # metrics shown in the progress bar


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to overwrite an existing model unless resuming."""
    if out.exists() and not out.is_dir():
        raise CfjaxError(f"--out {out} exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists() and not parent.is_dir():
        raise CfjaxError(f"--out {out}: directory {parent} does not exist")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise CfjaxError(f"--out {out}: {'directory' if out.exists() else parent} is not writable")
    has_model = (out / ckpt.MODEL_FILE).exists() or (out / ckpt.CKPT_SUBDIR).exists()
    if has_model and not resume:
        raise CfjaxError(f"{out} already holds a model: pass --resume to continue it, or choose another --out")
    if resume and not has_model:
        raise CfjaxError(f"--resume: {out} holds no checkpoint to resume from")


def fit(
    spec: TrainSpec,
    train: Dataset,
    test: Dataset | None,
    out: str | Path,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 200,
    max_steps: int | None = None,
    quiet: bool = False,
    total_steps: int | None = None,
) -> tuple[Any, dict]:
    """Train, checkpointing every ``checkpoint_every`` steps and at the end; returns (state, metrics).

    ``max_steps`` stops early (after saving), which tests use to simulate a killed run.
    ``total_steps`` sets the length of the run in steps (default ``epochs`` x steps per epoch).
    A resumed run must have the same length: extending a run would change its schedule.
    """
    out = Path(out)
    if epochs <= 0:
        raise CfjaxError(f"--epochs must be positive, got {epochs}")
    if batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {batch_size}")
    n = len(train)
    if n < batch_size:
        raise CfjaxError(f"--batch-size {batch_size} is larger than the training set ({n} images)")
    check_out_dir(out, resume)
    if checkpoint_every <= 0:
        raise CfjaxError(f"--checkpoint-every must be positive, got {checkpoint_every}")
    steps_per_epoch = n // batch_size  # drop the ragged last batch: one compiled shape
    if total_steps is None:
        total_steps = epochs * steps_per_epoch
    elif total_steps <= 0:
        raise CfjaxError(f"--steps must be positive, got {total_steps}")

    state = spec.init_state()
    start_step = 0
    seconds_before = 0.0  # training time of the run(s) this one resumes
    images_before = 0
    if resume:
        info = ckpt.read_model_info(out, expected_kind=spec.kind)
        if info["config"] != spec.config:
            raise CfjaxError(f"--resume: {out} was trained with another config; resume with the same options")
        changed = [k for k, v in spec.info.items() if k in info and info[k] != v]
        if changed:
            raise CfjaxError(
                f"--resume: {out} was trained with " + ", ".join(f"{k}={info[k]!r}" for k in changed)
                + "; resume with the same values, not " + ", ".join(f"{k}={spec.info[k]!r}" for k in changed)
            )
        state, meta, start_step = ckpt.load_checkpoint(out, state)
        seconds_before = float(meta.get("train_seconds", 0.0))
        images_before = int(meta.get("images_seen", 0))
        if meta.get("seed", seed) != seed or meta.get("batch_size", batch_size) != batch_size:
            raise CfjaxError(
                f"--resume: {out} was trained with seed {meta.get('seed')} and batch size "
                f"{meta.get('batch_size')}; resume with the same values"
            )
        before = meta.get("total_steps", meta.get("epochs", epochs) * steps_per_epoch)
        if before != total_steps:
            raise CfjaxError(
                f"--resume: {out} is a run of {before} steps ({meta.get('epochs')} epochs); this command asks for "
                f"{total_steps} (--epochs {epochs}); resume with the same --epochs/--steps (a longer run changes the schedule)"
            )
    else:
        ckpt.write_model_info(out, spec.kind, spec.config, status="training", dataset=train.name, **spec.info)

    base_key = jax.random.PRNGKey(seed)

    def save(step: int, state) -> None:
        elapsed = seconds_before + time.perf_counter() - t0
        meta = {"seed": seed, "batch_size": batch_size, "epochs": epochs, "total_steps": total_steps, "train_seconds": elapsed, "images_seen": images_before + images_seen}
        ckpt.save_checkpoint(out, step, state, meta)

    history: list[dict] = []
    t0 = time.perf_counter()
    images_seen = 0  # in this process
    step = start_step
    with progress_bar(total_steps, f"train {spec.kind}", disable=quiet) as bar:
        bar.advance(start_step)
        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            order = np.random.default_rng(seed + epoch).permutation(n)
            for b in range(pos, steps_per_epoch):
                if step >= total_steps:
                    break
                idx = order[b * batch_size : (b + 1) * batch_size]
                key = jax.random.fold_in(base_key, step)
                state, metrics = spec.train_step(state, train.images[idx], train.labels[idx], key)
                step += 1
                images_seen += batch_size
                if step % 10 == 0 or step == total_steps:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not all(math.isfinite(v) for v in m.values()):
                        raise CfjaxError(f"training diverged at step {step} (metrics {m}); lower the learning rate")
                    history.append({"step": step, **m})
                    bar.update(step, epoch=f"{epoch + 1}/{epochs}", **{k: m[k] for k in spec.show if k in m})
                else:
                    bar.update(step)
                final = step == total_steps
                if (step % checkpoint_every == 0 and not final) or (final and spec.finalize is None):
                    save(step, state)
                if max_steps is not None and step >= max_steps:
                    save(step, state)
                    return state, {"stopped_at_step": step}
    train_seconds = seconds_before + time.perf_counter() - t0
    images_total = images_before + images_seen
    if spec.finalize is not None:
        state = spec.finalize(state, train)
        save(step, state)
    metrics = {"train_seconds": round(train_seconds, 2), "train_images_per_s": round(images_total / max(train_seconds, 1e-9), 1)}
    if test is not None:
        metrics.update({k: float(v) for k, v in spec.evaluate(state, test).items()})
    ckpt.write_model_info(
        out,
        spec.kind,
        spec.config,
        status="complete",
        dataset=train.name,
        metrics=metrics,
        train_settings={"epochs": epochs, "batch_size": batch_size, "seed": seed, "steps": step},
        **spec.info,
    )
    return state, metrics


def random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Shift each image by an independent integer offset in [-max_shift, max_shift]^2, zero fill.

    x: (B, H, W, C) -> (B, H, W, C).
    """
    if max_shift <= 0:
        return x
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)
