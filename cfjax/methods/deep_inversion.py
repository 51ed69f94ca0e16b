"""DeepInversion (Yin et al., CVPR 2020): images optimised from noise to look like a class to a
BatchNorm classifier, as pure functions; and what it shares with DISC.

A batch of images is optimised with Adam on

    CE(F(x), y)                                         look like class y to the classifier
  + bn_weight * sum_l w_l (||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2)
                                                        per-batch statistics of every BatchNorm
                                                        layer's input match its running statistics
                                                        (w_1 = first_bn_weight, other w_l = 1)
  + tv_weight * TV(x) + l2_weight * mean(x^2)           image priors

with a random shift of up to ``jitter`` pixels per step and a projection onto [0, 1] after every
step; the classifier runs in eval mode (running statistics). The BatchNorm inputs are captured
and scored by :mod:`cfjax.methods.bn_capture`. :func:`total_variation` is the one image-smoothness
prior of cfjax (DISC uses its squared 4-direction form, DeepInversion here its L1 2-direction
form), :func:`chunk_lengths` the one plan of unrolled chunks both optimisations run in, and
:func:`random_shift` the one jitter / shift augmentation (the trainers use it too). The host
loop with its progress bar is :func:`cfjax.pipelines.synthesize.synthesize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cfjax.errors import CfjaxError
from cfjax.methods.bn_capture import bn_statistics_loss, capture
from cfjax.validation import non_negative_float, non_negative_int, positive_float, positive_int

__all__ = ["UNROLL", "chunk_lengths", "total_variation", "random_shift", "InversionConfig", "inversion_loss",
           "schedule", "init_batch", "run_chunk", "final"]

# Steps per compiled chunk. An optimisation runs as a host loop over jitted chunks of fully
# unrolled steps, not as one rolled ``lax.scan``: XLA:CPU runs the gradient of a convolution
# inside a while-loop body several times slower than in straight-line code (the timings are in
# benchmarks/results/profile_loop_cpu.json).
UNROLL = 10


def chunk_lengths(steps: int, unroll: int = UNROLL) -> list[int]:
    """``steps`` split into chunks of ``unroll`` steps and one shorter remainder, in order."""
    return [unroll] * (steps // unroll) + ([steps % unroll] if steps % unroll else [])


def total_variation(x: jax.Array, norm: str = "l2", diagonals: bool = True) -> jax.Array:
    """Total variation per image: x (B, H, W, C) -> (B,).

    The mean over pixels of the neighbour differences' square (``norm="l2"``) or absolute value
    (``"l1"``), summed over the horizontal and vertical directions and, with ``diagonals``, both
    diagonal ones. DISC's prior is the default; DeepInversion's anisotropic TV is
    ``norm="l1", diagonals=False``.
    """
    if norm not in ("l1", "l2"):
        raise CfjaxError(f"unknown total-variation norm {norm!r}: choose l1 or l2")

    def mean(d):
        return jnp.mean(d * d if norm == "l2" else jnp.abs(d), (1, 2, 3))

    if not diagonals:
        return mean(x[:, 1:, :] - x[:, :-1, :]) + mean(x[:, :, 1:] - x[:, :, :-1])
    return (
        mean(x[:, :, 1:] - x[:, :, :-1])
        + mean(x[:, 1:, :] - x[:, :-1, :])
        + mean(x[:, 1:, 1:] - x[:, :-1, :-1])
        + mean(x[:, 1:, :-1] - x[:, :-1, 1:])
    )


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


@dataclass(frozen=True)
class InversionConfig:
    """DeepInversion's settings: Adam ``steps`` at ``lr`` (cosine decay); the weights of the
    BatchNorm-statistics term (``bn_weight``, first layer x ``first_bn_weight``), total
    variation and l2 prior; a random shift of up to ``jitter`` pixels per step; the starting
    noise N(init_mean, init_std^2) clipped to [0, 1]."""

    steps: int = 100
    lr: float = 0.2
    bn_weight: float = 1.0
    first_bn_weight: float = 10.0
    tv_weight: float = 0.1
    l2_weight: float = 0.0
    jitter: int = 1
    init_mean: float = 0.2
    init_std: float = 0.1
    unroll: int = UNROLL      # steps per compiled chunk (see chunk_lengths)

    def __post_init__(self):
        positive_int(self.unroll, "inversion unroll")
        positive_int(self.steps, "inversion steps")
        positive_float(self.lr, "inversion lr")
        for name in ("bn_weight", "first_bn_weight", "tv_weight", "l2_weight"):
            non_negative_float(getattr(self, name), f"inversion {name}")
        non_negative_int(self.jitter, "inversion jitter")


def inversion_loss(apply_fn: Callable, variables, cfg: InversionConfig, x: jax.Array, y: jax.Array):
    """(loss, {'ce', 'bn', 'tv', 'l2', 'acc'}) for images x (B, H, W, C) and targets y (B,)."""
    cap = capture(apply_fn, variables, x, feature_layer=None)
    if not cap.bn_inputs:
        raise CfjaxError("DeepInversion needs a classifier with BatchNorm layers; this model has none (e.g. an MLP)")
    logits = cap.logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    bn = bn_statistics_loss(cap.bn_inputs, cap.bn_stats, "batch", cfg.first_bn_weight)
    tv = jnp.mean(total_variation(x, norm="l1", diagonals=False))
    l2 = jnp.mean(x**2)
    loss = ce + cfg.bn_weight * bn + cfg.tv_weight * tv + cfg.l2_weight * l2
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, {"ce": ce, "bn": bn, "tv": tv, "l2": l2, "acc": acc}


def schedule(cfg: InversionConfig):
    return optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.05))


def init_batch(cfg: InversionConfig, image_shape: tuple, y: jax.Array, key: jax.Array):
    """Starting noise (B, H, W, C) in [0, 1] and the Adam state."""
    x0 = jnp.clip(cfg.init_mean + cfg.init_std * jax.random.normal(key, (y.shape[0], *image_shape)), 0.0, 1.0)
    return x0, schedule(cfg).init(x0)


def run_chunk(apply_fn: Callable, cfg: InversionConfig, length: int, variables, y, x, opt_state, key, step0):
    """``length`` Adam steps (a fully unrolled ``lax.scan``) from step ``step0``; returns (x, opt_state, aux)."""
    opt = schedule(cfg)

    def objective(xx, k):
        return inversion_loss(apply_fn, variables, cfg, random_shift(k, xx, cfg.jitter), y)

    def body(carry, step):
        xx, os = carry
        (_, aux), g = jax.value_and_grad(objective, has_aux=True)(xx, jax.random.fold_in(key, step))
        updates, os = opt.update(g, os, xx)
        return (jnp.clip(optax.apply_updates(xx, updates), 0.0, 1.0), os), aux

    (x, opt_state), hist = jax.lax.scan(body, (x, opt_state), step0 + jnp.arange(length), unroll=True)
    return x, opt_state, jax.tree_util.tree_map(lambda h: h[-1], hist)


def final(apply_fn: Callable, cfg: InversionConfig, variables, y, x):
    _, aux = inversion_loss(apply_fn, variables, cfg, x, y)
    return jnp.argmax(apply_fn(variables, x), -1), aux
