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
import numpy as np

from cfjax import checkpoint as ckpt
from cfjax.data import Dataset
from cfjax.errors import CfjaxError
from cfjax.methods.deep_inversion import random_shift  # noqa: F401 - the trainers' augmentation
from cfjax.pipelines.progress import progress_bar
from cfjax.validation import positive_int

CHECKPOINT_EVERY = 200  # steps between checkpoints, unless the trainer is told otherwise

# (state, x (B,H,W,C), y (B,), key) -> (state, metrics: dict[str, scalar])
TrainStep = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[Any, dict]]
# (state, dataset) -> dict[str, float]
EvalFn = Callable[[Any, Dataset], dict]


@dataclass(frozen=True)
class TrainingRecipe:
    """How a classifier or DUQ trainer optimises: AdamW at peak ``lr`` with ``weight_decay``,
    ``epochs`` passes in batches of ``batch_size``, random shifts of up to ``augment_shift``
    pixels. Each trainer's defaults are its ``DEFAULT_TRAINING`` instance."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment_shift: int = 0
    seed: int = 0
    checkpoint_every: int = CHECKPOINT_EVERY

    def __post_init__(self):
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch_size")


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


def _resume(spec: TrainSpec, out: Path, state, *, seed: int, batch_size: int, epochs: int, total_steps: int,
            steps_per_epoch: int) -> tuple[Any, int, float, int]:
    """Restore the run in ``out`` into ``state``: (state, step, seconds and images before). The
    run must have been started with the same config, trainer settings, seed, batch size and length."""
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
    return state, start_step, seconds_before, images_before


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
    checkpoint_every: int = CHECKPOINT_EVERY,
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
    positive_int(epochs, "epochs")
    positive_int(checkpoint_every, "checkpoint_every")
    steps_per_epoch, total_steps = _run_length(len(train), epochs, batch_size, total_steps)
    check_out_dir(out, resume)

    state = spec.init_state()
    start_step = 0
    seconds_before = 0.0  # training time of the run(s) this one resumes
    images_before = 0
    if resume:
        state, start_step, seconds_before, images_before = _resume(
            spec, out, state, seed=seed, batch_size=batch_size, epochs=epochs, total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
    else:
        ckpt.write_model_info(out, spec.kind, spec.config, status="training", dataset=train.name, **spec.info)

    base_key = jax.random.PRNGKey(seed)

    def save(step: int, state) -> None:
        elapsed = seconds_before + time.perf_counter() - t0
        meta = {"seed": seed, "batch_size": batch_size, "epochs": epochs, "total_steps": total_steps, "train_seconds": elapsed, "images_seen": images_before + images_seen}
        ckpt.save_checkpoint(out, step, state, meta)

    t0 = time.perf_counter()
    images_seen = 0  # in this process
    step = start_step
    with progress_bar(total_steps, f"train {spec.kind}", disable=quiet) as bar:
        bar.advance(start_step)
        for s, epoch, idx in _batch_indices(len(train), batch_size, steps_per_epoch, seed, start_step, total_steps):
            state, metrics = spec.train_step(state, train.images[idx], train.labels[idx], jax.random.fold_in(base_key, s))
            step = s + 1
            images_seen += batch_size
            if step % 10 == 0 or step == total_steps:
                m = _finite_metrics(metrics, step)
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
    if spec.finalize is not None:
        state = spec.finalize(state, train)
        save(step, state)
    metrics = {"train_seconds": round(train_seconds, 2),
               "train_images_per_s": round((images_before + images_seen) / max(train_seconds, 1e-9), 1)}
    return state, _complete(spec, state, train, test, out, metrics, {"epochs": epochs, "batch_size": batch_size, "seed": seed, "steps": step})


def _run_length(n: int, epochs: int, batch_size: int, total_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, steps in all) of a run over ``n`` images; the ragged last batch of an
    epoch is dropped, so one shape compiles."""
    positive_int(batch_size, "batch_size")
    if total_steps is not None:
        positive_int(total_steps, "total_steps")
    if n < batch_size:
        raise CfjaxError(f"batch size {batch_size} is larger than the training set ({n} images)")
    steps_per_epoch = n // batch_size
    return steps_per_epoch, epochs * steps_per_epoch if total_steps is None else total_steps


def _batch_indices(n: int, batch_size: int, steps_per_epoch: int, seed: int, start: int, total: int):
    """(step, epoch, image indices) of every step in [start, total): epoch e visits the images
    in the order ``default_rng(seed + e)`` gives, so a resumed run continues the same sequence."""
    step = start
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        for b in range(pos, min(steps_per_epoch, pos + total - step)):
            yield step, epoch, order[b * batch_size : (b + 1) * batch_size]
            step += 1


def _finite_metrics(metrics: dict, step: int) -> dict:
    """The step's metrics as floats; CfjaxError when one is NaN or infinite (a diverged run)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in m.values()):
        raise CfjaxError(f"training diverged at step {step} (metrics {m}); lower the learning rate")
    return m


def _complete(spec: TrainSpec, state, train: Dataset, test: Dataset | None, out: Path, metrics: dict, settings: dict) -> dict:
    """Evaluate the finished run on ``test`` and mark ``out`` complete; returns all metrics."""
    if test is not None:
        metrics.update({k: float(v) for k, v in spec.evaluate(state, test).items()})
    ckpt.write_model_info(
        out,
        spec.kind,
        spec.config,
        status="complete",
        dataset=train.name,
        metrics=metrics,
        train_settings=settings,
        **spec.info,
    )
    return metrics
