"""Data-free training images: the host loop of DeepInversion (:mod:`cfjax.methods.deep_inversion`).

:func:`synthesize` optimises batches of images from noise towards balanced target classes, in
the jitted unrolled chunks of :func:`cfjax.methods.deep_inversion.chunk_lengths`, with a
progress bar, and labels them by the classifier. The objective, its settings
(:class:`InversionConfig`) and the chunk step are pure functions of the methods layer.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.methods.deep_inversion import InversionConfig, chunk_lengths, final, init_batch, inversion_loss, run_chunk  # noqa: F401 - InversionConfig, inversion_loss: this module's API too
from cfjax.pipelines.progress import progress_bar
from cfjax.validation import positive_int


def synthesize(
    apply_fn: Callable,
    variables,
    image_shape: tuple[int, ...],
    num_classes: int,
    num_images: int,
    *,
    batch_size: int = 200,
    cfg: InversionConfig = InversionConfig(),
    seed: int = 0,
    quiet: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Synthesise ``num_images`` images from the classifier by DeepInversion.

    Targets cycle through the classes (balanced). Returns (images (N, H, W, C) float32 in [0, 1],
    targets (N,) int32, classifier labels argmax F(x) (N,) int32, summary dict).
    """
    positive_int(num_images, "num_images")
    positive_int(batch_size, "batch_size")
    image_shape = tuple(image_shape)
    init = jax.jit(partial(init_batch, cfg, image_shape))
    chunks = chunk_lengths(cfg.steps, cfg.unroll)
    runs = {n: jax.jit(partial(run_chunk, apply_fn, cfg, n)) for n in set(chunks)}
    finish = jax.jit(partial(final, apply_fn, cfg))
    targets = (np.arange(num_images) % num_classes).astype(np.int32)
    xs, preds, finals = [], [], []
    n_batches = -(-num_images // batch_size)
    with progress_bar(n_batches * cfg.steps, "deep inversion", disable=quiet) as bar:
        for b in range(n_batches):
            y = targets[b * batch_size : (b + 1) * batch_size]
            # Pad the last batch to the compiled shape (BN statistics need a full batch).
            y_full = jnp.asarray(np.concatenate([y, targets[: batch_size - len(y)]]) if len(y) < batch_size else y)
            k_init, k_steps = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), b))
            x, opt_state = init(y_full, k_init)
            step = 0
            for n in chunks:
                x, opt_state, aux = runs[n](variables, y_full, x, opt_state, k_steps, step)
                step += n
                bar.update(b * cfg.steps + step, ce=float(aux["ce"]), bn=float(aux["bn"]))
            pred, fin = finish(variables, y_full, x)
            xs.append(np.asarray(x)[: len(y)])
            preds.append(np.asarray(pred)[: len(y)])
            finals.append({k: float(v) for k, v in fin.items()})
    images = np.concatenate(xs).astype(np.float32)
    labels = np.concatenate(preds).astype(np.int32)
    summary = {k: float(np.mean([f[k] for f in finals])) for k in finals[0]}
    summary["target_agreement"] = float(np.mean(labels == targets))
    return images, targets, labels, summary
