"""DISC: counterfactuals for a trained classifier by deep model inversion (Thiagarajan et al., 2021).

Given only a classifier F (any Flax linen model, ideally with BatchNorm), a query x and a target
class y', optimise an image x_bar = render(phi) (see :mod:`cfjax.models.priors`) to minimise

    L = lambda_cf   * target_class_loss(F(x_bar), y')          reach the target (CE or a target prob.)
      + lambda_feat * feature_proximity(F_l(x_bar), F_l(x))     keep the query's classifier features
      + lambda_mc   * manifold_consistency(K(x_bar), y')        DUQ kernel of the target class
      + lambda_bn   * bn_statistics_loss(...)                   DeepInversion BatchNorm statistics
      + lambda_tv   * total_variation(x_bar) + lambda_l2 * l2_prior(x_bar)
      + lambda_ink  * ink_prior(x_bar)                          strokes, not grey (off by default)
      + lambda_keep * ink_shortfall(x_bar, x, keep_fraction)     do not erase the digit (off by default)
      + lambda_frame * frame_ink(x_bar, frame_width)             no ink at the border (off by default)
      + lambda_l1   * pixel_proximity(x_bar, x)

Each term is its own pure function (per-example values, batch = leading axis); the BatchNorm
capture and statistics term live in :mod:`cfjax.methods.bn_capture`, the total variation in
:mod:`cfjax.methods.deep_inversion`, shared with data-free DeepInversion.
:func:`generate` runs the whole optimisation for N queries at once: one ``jax.jit`` per stage,
``jax.vmap`` over examples, ``lax.scan`` over steps, Optax Adam with a cosine schedule;
progressive stages raise the target probability (warm-starting each from the last) and give a
trajectory (S, N, H, W, C); the best iterate that reaches the target with margin is kept.

BatchNorm conventions (``bn_convention``):

- ``"image"`` (the default): the statistics of a BN layer's input are taken over (H, W) of each
  image separately, so every query is optimised independently. This is what ``jax.vmap`` over
  single examples gives by construction (inside vmap each call sees a batch of one image), and
  :func:`generate` uses the vmapped per-example path for it. BN layers whose inputs have no
  spatial axes (after a Dense layer) have no per-image statistics and are skipped.
- ``"batch"``: statistics over (N, H, W) of the whole batch (DeepInversion's original): the
  examples are coupled, so :func:`generate` optimises the batch jointly (no per-example vmap),
  and results depend on which queries share a batch. For a batch of one image the two agree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cfjax.errors import CfjaxError
from cfjax.methods.bn_capture import BN_CONVENTIONS, Capture, bn_statistics_loss, capture  # noqa: F401 - part of this module's API
from cfjax.methods.deep_inversion import UNROLL, chunk_lengths, random_shift, total_variation  # noqa: F401 - part of this module's API
from cfjax.models import priors as priors_lib
from cfjax.parallel import batch_mesh_of, per_example, per_slice
from cfjax.validation import non_negative_int, positive_float, positive_int, validate_images, validate_targets

TARGET_MODES = ("ce", "prob")
MC_MODES = ("nll", "max")
SCHEDULES = ("cosine", "constant")
_TINY = 1e-30


# ----------------------------------------------------------------------------------------------
# Objective terms: pure functions, batch on the leading axis.


def target_class_loss(logits: jax.Array, target: jax.Array, mode: str = "ce", target_prob: float | jax.Array | None = None) -> jax.Array:
    """Push F(x_bar) to class ``target``. logits (B, C), target (B,) int -> (B,).

    ``"ce"``: cross-entropy -log p(y'|x_bar).
    ``"prob"``: hinge on the log-probability gap to ``target_prob`` t in (0, 1]:
    max(0, log t - log p(y'|x_bar)) = max(0, CE - (-log t)); zero once p(y') >= t, so a stage of
    the progressive schedule asks for "at least t" and the other terms then keep the change small
    (t = 1 is the cross-entropy itself).
    """
    _check_target_mode(mode)
    logp = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logp, target[:, None].astype(jnp.int32), -1)[:, 0]
    if mode == "ce":
        return -lp
    if target_prob is None:
        raise CfjaxError("target_class_loss mode 'prob' needs target_prob in (0, 1)")
    return jax.nn.relu(jnp.log(target_prob) - lp)


def _check_target_mode(mode: str) -> None:
    if mode not in TARGET_MODES:
        raise CfjaxError(f"unknown target loss mode {mode!r}: choose one of {', '.join(TARGET_MODES)}")


def feature_proximity(feats_cf: jax.Array, feats_query: jax.Array) -> jax.Array:
    """Mean squared difference of classifier features (B, ...) and the query's (B, ...) -> (B,).

    (= ||F_l(x_bar) - F_l(x)||^2 / D, so the weight does not depend on the layer width D.)
    """
    d = (feats_cf - feats_query).reshape(feats_cf.shape[0], -1)
    return jnp.mean(d * d, -1)


def manifold_consistency(K: jax.Array, target: jax.Array, mode: str = "nll", is_log: bool = False) -> jax.Array:
    """Manifold consistency from DUQ kernel values K (B, C) in [0, 1] -> (B,).

    ``"nll"``: -log K_{y'} (pull x_bar onto the target class centroid; with DUQ's RBF kernel this
    is the squared distance to the centroid over 2 sigma^2). ``"max"``: 1 - max_c K_c (be
    certain of some class, i.e. stay near the data). ``is_log=True``: K holds log K (exact far
    from every centroid, where K itself underflows to 0 and its gradient vanishes).
    """
    log_k = K if is_log else jnp.log(jnp.maximum(K, _TINY))
    if mode == "nll":
        return -jnp.take_along_axis(log_k, target[:, None].astype(jnp.int32), -1)[:, 0]
    if mode == "max":
        return 1.0 - jnp.exp(jnp.max(log_k, -1))
    raise CfjaxError(f"unknown manifold-consistency mode {mode!r}: choose one of {', '.join(MC_MODES)}")


def l2_prior(x: jax.Array) -> jax.Array:
    """Mean squared pixel value, x (B, H, W, C) -> (B,)."""
    return jnp.mean(x * x, (1, 2, 3))


def ink_prior(x: jax.Array) -> jax.Array:
    """Mean x(1 - x) per image, x (B, H, W, C) in [0, 1] -> (B,): 0 where every pixel is 0 or 1
    (ink or paper), largest for mid-grey, so it prefers drawn strokes to a grey haze."""
    return jnp.mean(x * (1.0 - x), (1, 2, 3))


def ink_shortfall(x: jax.Array, x_query: jax.Array, fraction: float) -> jax.Array:
    """How far the ink (mean pixel value) of x falls short of ``fraction`` of the query's, as a
    share of that amount: max(0, f·ink(x_query) - ink(x)) / (f·ink(x_query)); (B, H, W, C) twice
    -> (B,) in [0, 1]. Zero while x keeps enough ink, 1 for an empty image: a counterfactual of a
    digit is a digit, not an erased page (which classifiers tend to read as a 1)."""
    need = fraction * jnp.mean(x_query, (1, 2, 3))
    return jax.nn.relu(need - jnp.mean(x, (1, 2, 3))) / jnp.maximum(need, _TINY)


def frame_ink(x: jax.Array, width: int) -> jax.Array:
    """Mean pixel value of the outer frame ``width`` pixels wide, x (B, H, W, C) -> (B,). MNIST's
    digits are scaled into the central 20x20 box of 28x28, so real digits leave a 4-pixel frame
    (almost) empty, while a counterfactual that paints a bar along the border (which classifiers
    readily call a 1) fills it."""
    h, w = x.shape[1:3]
    inner = jnp.zeros((h, w), bool).at[width : h - width, width : w - width].set(True)
    frame = (~inner).astype(x.dtype)[None, :, :, None]
    return jnp.sum(x * frame, (1, 2, 3)) / (jnp.sum(frame) * x.shape[-1])


def pixel_proximity(x: jax.Array, x_query: jax.Array, p: float = 1) -> jax.Array:
    """Mean |x - x_query|^p per image: (B, H, W, C) twice -> (B,) (p=1: mean absolute change)."""
    return jnp.mean(jnp.abs(x - x_query) ** p, (1, 2, 3))


def reaches_target(probs: jax.Array, target: jax.Array, margin: float) -> jax.Array:
    """p(y') - max_{c != y'} p(c) >= margin. probs (B, C), target (B,) -> (B,) bool."""
    t = target[:, None].astype(jnp.int32)
    pt = jnp.take_along_axis(probs, t, -1)[:, 0]
    others = jnp.where(jax.nn.one_hot(target, probs.shape[-1], dtype=bool), -jnp.inf, probs)
    return pt - jnp.max(others, -1) >= margin


# ----------------------------------------------------------------------------------------------
# Configuration.


# Named sets of image-prior weights (:func:`styled`). "strokes" is for handwriting on a black page
# (MNIST-like): pixels at 0 or 1 rather than grey, at least half the query's ink kept (no erased
# page), nothing in the outer frame (no bar along the border). Chosen on mnist5k by the judge panel
# and the stroke-texture metrics (README, "DISC: the ablation behind the defaults").
STYLES: dict[str, dict[str, float]] = {
    "plain": {"lambda_ink": 0.0, "lambda_keep": 0.0, "lambda_frame": 0.0},
    "strokes": {"lambda_ink": 8.0, "lambda_keep": 5.0, "lambda_frame": 5.0},
}


@dataclass(frozen=True)
class DISCConfig:
    """Every DISC setting (weights, schedule, prior, stages). Frozen and hashable (jit-static).

    Weights: lambda_cf (target class), lambda_feat (classifier-feature proximity), lambda_mc
    (DUQ manifold consistency; used only when a DUQ model is given), lambda_bn (BatchNorm
    statistics), lambda_tv (total variation), lambda_l2 (l2 prior), lambda_l1 (l1 proximity),
    lambda_ink (ink prior: pixels near 0 or 1), lambda_keep (ink shortfall below
    ``keep_fraction`` of the query's ink), lambda_frame (ink in the outer frame ``frame_width``
    pixels wide).
    steps: counterfactual steps in all (split evenly over the stages); lr: Adam learning rate
    (None: the prior's default); schedule: "cosine" decay within each stage or "constant";
    prior: "pixels" | "dip" | "inr" with ``prior_options`` ((field, value), ...) for its
    dataclass; fit_steps / fit_lr: the MSE fit of a DIP/INR generator to the query;
    progressive: raise p(y') through ``stages`` (target probabilities in (0, 1], 1 = plain
    cross-entropy; each stage warm-starts from the last with a fresh Adam state and schedule)
    instead of one cross-entropy stage; coarse_to_fine: (pixels prior) optimise
    at half resolution in the first stage (or first half) then at full resolution; margin:
    x_bar "reaches the target" when p(y') - max_{c != y'} p(c) >= margin; bn_convention: "image"
    (per-example, vmapped) or "batch" (joint); feature_layer: see :func:`capture`; jitter:
    DeepInversion's random jitter, a translation of x_bar by up to ``jitter`` pixels in each
    direction (zero fill, drawn per step, the same for the whole batch) before the classifier,
    the BatchNorm term and DUQ see it at each optimisation step (0 = off): a change that only
    works at one exact pixel position stops paying off, so the optimisation has to move strokes.
    """

    # Defaults chosen by examples/disc_ablation.py (see examples/results/disc_ablation.md) and,
    # for the DIP prior with jitter 2, by the judge panel (README, "DISC: the ablation behind the defaults").
    lambda_cf: float = 1.0
    lambda_feat: float = 0.0
    lambda_mc: float = 1.0
    lambda_bn: float = 0.01
    lambda_tv: float = 1.0
    lambda_l2: float = 0.05
    lambda_l1: float = 0.5
    lambda_ink: float = 0.0
    lambda_keep: float = 0.0
    keep_fraction: float = 0.5
    lambda_frame: float = 0.0
    frame_width: int = 4
    steps: int = 300
    lr: float | None = None
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    prior: str = "dip"
    prior_options: tuple = ()
    fit_steps: int = 300
    fit_lr: float | None = None
    progressive: bool = True
    stages: tuple[float, ...] = (0.5, 0.9, 0.999)
    coarse_to_fine: bool = False
    margin: float = 0.2
    bn_convention: str = "image"
    first_bn_weight: float = 10.0
    feature_layer: str = "penultimate"
    mc_mode: str = "nll"
    jitter: int = 2
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            if f.name.startswith("lambda_") or f.name == "first_bn_weight":
                v = getattr(self, f.name)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise CfjaxError(f"DISC weight {f.name} must be a finite number >= 0, got {v!r}", argument=f.name)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise CfjaxError(f"DISC steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.fit_steps, int) or self.fit_steps < 0:
            raise CfjaxError(f"DISC fit_steps must be an integer >= 0, got {self.fit_steps!r}")
        for name in ("lr", "fit_lr"):
            if getattr(self, name) is not None:
                positive_float(getattr(self, name), f"DISC {name}")
        if self.prior not in priors_lib.PRIORS:
            raise CfjaxError(f"unknown prior {self.prior!r}: choose one of {', '.join(priors_lib.PRIORS)}")
        try:
            opts = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in dict(self.prior_options).items())
            object.__setattr__(self, "prior_options", opts)
            self.make_prior()
        except TypeError as e:
            raise CfjaxError(f"bad prior_options for prior {self.prior!r}: {e}") from None
        if self.schedule not in SCHEDULES:
            raise CfjaxError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise CfjaxError(f"DISC betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        stages = tuple(float(s) for s in self.stages)
        if self.progressive and (not stages or not all(0 < s <= 1 for s in stages) or any(b <= a for a, b in zip(stages, stages[1:]))):
            raise CfjaxError(f"DISC stages must be increasing target probabilities in (0, 1], got {self.stages!r}")
        object.__setattr__(self, "stages", stages)
        if self.progressive and self.steps < len(stages):
            raise CfjaxError(f"DISC steps ({self.steps}) must be at least the number of progressive stages ({len(stages)})")
        if self.coarse_to_fine and self.prior != "pixels":
            raise CfjaxError(f"coarse_to_fine is implemented for the pixels prior only, not {self.prior!r}")
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise CfjaxError(f"DISC keep_fraction must be in (0, 1], got {self.keep_fraction!r}", argument="keep_fraction")
        positive_int(self.frame_width, "DISC frame_width")
        if not (isinstance(self.margin, (int, float)) and 0 <= self.margin < 1):
            raise CfjaxError(f"DISC margin must be in [0, 1), got {self.margin!r}")
        if self.bn_convention not in BN_CONVENTIONS:
            raise CfjaxError(f"unknown bn_convention {self.bn_convention!r}: choose one of {', '.join(BN_CONVENTIONS)}")
        non_negative_int(self.jitter, "jitter")
        if self.mc_mode not in MC_MODES:
            raise CfjaxError(f"unknown mc_mode {self.mc_mode!r}: choose one of {', '.join(MC_MODES)}")

    def make_prior(self) -> priors_lib.Prior:
        return priors_lib.make_prior(self.prior, **dict(self.prior_options))

    def replace(self, **changes) -> "DISCConfig":
        from dataclasses import replace

        return replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# The optimisation.


@dataclass(frozen=True)
class Stage:
    """Everything static about one stage of the optimisation (hashable: the jit-static argument
    of :func:`run_stage`). Build it with :func:`make_stage`."""

    apply_fn: Callable
    apply_kwargs: tuple
    kernel_fn: Callable | None
    prior: Any
    config: DISCConfig
    mode: str
    steps: int
    lr: float
    use_bn: bool
    use_feat: bool
    mesh: Any = None


def styled(config: "DISCConfig", style: str) -> "DISCConfig":
    """``config`` with the image-prior weights of :data:`STYLES` ``[style]`` (CfjaxError naming
    the styles for an unknown one)."""
    if style not in STYLES:
        raise CfjaxError(f"unknown DISC style {style!r}: choose one of {', '.join(STYLES)}")
    return config.replace(**STYLES[style])


def make_stage(apply_fn: Callable, config: DISCConfig, prior: Any, *, mode: str = "ce", steps: int | None = None,
               lr: float | None = None, apply_kwargs: dict | None = None, log_kernel_fn: Callable | None = None,
               mesh: Any = None) -> Stage:
    """The static part of one stage: ``steps`` Adam steps (default ``config.steps``) at learning
    rate ``lr`` (default ``config.lr``, else the prior's) on the target loss ``mode`` ("ce", or
    "prob" with the stage's target probability from :class:`StageData`), for classifier
    ``apply_fn(variables, x, **apply_kwargs)`` and, with ``log_kernel_fn``, DUQ manifold
    consistency. The config's seed and generator-fit settings act before the stages, so they are
    dropped here: runs that differ only there share the stage's compilation. ``mesh``: the
    one-axis mesh the queries are sharded over (see :mod:`cfjax.parallel`; None: one device);
    under the "image" BatchNorm convention each device then optimises its own slice."""
    _check_target_mode(mode)
    steps = config.steps if steps is None else steps
    lr = float(lr or config.lr or prior.default_lr)
    stage_cfg = dataclasses.replace(config, seed=0, fit_steps=0, fit_lr=None)
    return Stage(apply_fn, _freeze_kwargs(apply_kwargs), log_kernel_fn, prior, stage_cfg, mode, int(steps), lr,
                 config.lambda_bn > 0, config.lambda_feat > 0, mesh)


class StageData(NamedTuple):
    """The arrays every stage of one :func:`generate` call reads (N queries; a pytree, so the
    stage functions are vmapped and jitted over it as one argument).

    aux: the prior's per-query data (leading axis N); xq (N, H, W, C) the queries; fq (N, F) their
    classifier features or None; t (N,) the targets; target_prob () the stage's target
    probability; variables: the classifier's; duq_variables: DUQ's or None."""

    aux: Any
    xq: jax.Array
    fq: jax.Array | None
    t: jax.Array
    target_prob: jax.Array
    variables: Any
    duq_variables: Any


def jitter_key(step: jax.Array) -> jax.Array:
    """The key of optimisation step ``step`` () for the jitter translation: a pure function of
    the step, so a run is deterministic and every example of a step is moved alike."""
    return jax.random.fold_in(jax.random.key(0x0D15C), step)


def image_objective(x, d: StageData, spec: Stage, shift_key: jax.Array | None = None):
    """The DISC objective (module docstring) of images x (N, H, W, C) with queries, targets and
    models from ``d``: -> (total (), per-example (N,), classifier probabilities (N, C)). With
    ``bn_convention="image"`` the total is the mean of the per-example values; with "batch" it
    adds the batch's BatchNorm term, which has no per-example share.

    ``shift_key``: the models (classifier, BatchNorm term, DUQ) see x translated by up to
    ``config.jitter`` pixels (:func:`random_shift`, zero fill); the image priors and the
    proximity terms always see x itself."""
    cfg = spec.config
    seen = x if shift_key is None else random_shift(shift_key, x, cfg.jitter)
    cap = capture(spec.apply_fn, d.variables, seen, spec.apply_kwargs, cfg.feature_layer if spec.use_feat else None)
    per_ex = cfg.lambda_cf * target_class_loss(cap.logits, d.t, spec.mode, d.target_prob)
    if spec.use_feat:
        per_ex = per_ex + cfg.lambda_feat * feature_proximity(cap.features, d.fq)
    if spec.kernel_fn is not None and cfg.lambda_mc > 0:
        per_ex = per_ex + cfg.lambda_mc * manifold_consistency(spec.kernel_fn(d.duq_variables, seen), d.t, cfg.mc_mode, is_log=True)
    if cfg.lambda_tv > 0:
        per_ex = per_ex + cfg.lambda_tv * total_variation(x)
    if cfg.lambda_l2 > 0:
        per_ex = per_ex + cfg.lambda_l2 * l2_prior(x)
    if cfg.lambda_l1 > 0:
        per_ex = per_ex + cfg.lambda_l1 * pixel_proximity(x, d.xq, 1)
    if cfg.lambda_ink > 0:
        per_ex = per_ex + cfg.lambda_ink * ink_prior(x)
    if cfg.lambda_keep > 0:
        per_ex = per_ex + cfg.lambda_keep * ink_shortfall(x, d.xq, cfg.keep_fraction)
    if cfg.lambda_frame > 0:
        per_ex = per_ex + cfg.lambda_frame * frame_ink(x, cfg.frame_width)
    total: jax.Array | float = 0.0
    if spec.use_bn:
        bn = bn_statistics_loss(cap.bn_inputs, cap.bn_stats, cfg.bn_convention, cfg.first_bn_weight)
        if cfg.bn_convention == "image":
            per_ex = per_ex + cfg.lambda_bn * bn
        else:
            total = cfg.lambda_bn * bn
    return total + jnp.mean(per_ex), per_ex, jax.nn.softmax(cap.logits, -1)


def _loss_one(params, d: StageData, spec, shift_key=None):
    """One example (no batch axis): the vmapped per-image path."""
    x = spec.prior.render(params, d.aux)[None]
    one = d._replace(xq=d.xq[None], fq=None if d.fq is None else d.fq[None], t=d.t[None])
    total, per_ex, probs = image_objective(x, one, spec, shift_key)
    return total, (per_ex[0], probs[0], x[0])


def _loss_batch(params, d: StageData, spec, shift_key=None):
    """All examples jointly (BatchNorm statistics over the batch). The per-query generators
    render on each device's own slice; the rest is partitioned by ``jit``."""
    x = per_example(spec.prior.render, 0, spec.mesh)(params, d.aux)
    total, per_ex, probs = image_objective(x, d, spec, shift_key)
    return total, (per_ex, probs, x)


def _expand(m, x):
    return jnp.reshape(m, jnp.shape(m) + (1,) * (x.ndim - jnp.ndim(m)))


def _make_tx(cfg: DISCConfig, steps: int, lr: float):
    sched = optax.cosine_decay_schedule(lr, steps, alpha=0.02) if cfg.schedule == "cosine" else lr
    return optax.adam(sched, b1=cfg.betas[0], b2=cfg.betas[1])


def _update_best(best, per_ex, probs, x, t, margin):
    """Keep the iterate with the lowest loss among those reaching the target with margin."""
    b_loss, b_x, b_found = best
    ok = reaches_target(jnp.atleast_2d(probs), jnp.atleast_1d(t), margin).reshape(jnp.shape(per_ex))
    better = ok & (per_ex < b_loss)
    return jnp.where(better, per_ex, b_loss), jnp.where(_expand(better, x), x, b_x), b_found | ok


def _loss_fn(spec: Stage):
    return _loss_one if spec.config.bn_convention == "image" else _loss_batch


def _stage_begin(params, d: StageData, spec: Stage):
    """Carry (params, Adam state, best) at the start of a stage (one example or the batch)."""
    _, (per0, _, x0) = _loss_fn(spec)(params, d, spec)
    best0 = (jnp.full(jnp.shape(per0), jnp.inf), x0, jnp.zeros(jnp.shape(per0), bool))
    return params, _make_tx(spec.config, spec.steps, spec.lr).init(params), best0


def _stage_chunk(carry, d: StageData, spec: Stage, length: int):
    """``length`` Adam steps (a fully unrolled scan); the schedule continues from the Adam state."""
    loss_fn = _loss_fn(spec)
    tx = _make_tx(spec.config, spec.steps, spec.lr)

    jitter = spec.config.jitter

    def body(carry, _):
        p, s, best = carry
        if jitter:
            # keyed by the Adam step count: the step within the stage, the same for every example
            key = jitter_key(s[0].count)
            (_, (per_ex, _, x)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, d, spec, key)
            # "reaches the target" is judged on x_bar as it is, not on its jittered copy
            _, (per_ex, probs, _) = loss_fn(p, d, spec)
        else:
            (_, (per_ex, probs, x)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, d, spec)
        best = _update_best(best, per_ex, probs, x, d.t, spec.config.margin)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s, best), None

    carry, _ = jax.lax.scan(body, carry, None, length=length, unroll=True)
    return carry


def _stage_end(carry, d: StageData, spec: Stage):
    """(params, best image, best found, last image, last probs) after the last step."""
    params, _, best = carry
    _, (per_ex, probs, x) = _loss_fn(spec)(params, d, spec)
    best = _update_best(best, per_ex, probs, x, d.t, spec.config.margin)
    return params, best[1], best[2], x, probs


def _batched(fn, spec: Stage, d: StageData):
    """vmap over examples (params or carry, and the per-query fields of ``d``) for the per-image
    BatchNorm convention, each device of ``spec.mesh`` mapping its own slice; the batch as is
    for the batch convention (partitioned by ``jit``)."""
    if spec.config.bn_convention != "image":
        return fn
    # vmap axes per field, in field order: aux, xq, fq, t over queries; the rest shared
    axes = StageData._make((0, 0, None if d.fq is None else 0, 0, None, None, None))
    return per_example(fn, (0, axes), spec.mesh)


@partial(jax.jit, static_argnames=("spec",))
def _begin_jit(params, d: StageData, spec: Stage):
    return _batched(partial(_stage_begin, spec=spec), spec, d)(params, d)


@partial(jax.jit, static_argnames=("spec", "length"))
def _chunk_jit(carry, d: StageData, spec: Stage, length: int):
    return _batched(partial(_stage_chunk, spec=spec, length=length), spec, d)(carry, d)


@partial(jax.jit, static_argnames=("spec",))
def _end_jit(carry, d: StageData, spec: Stage):
    return _batched(partial(_stage_end, spec=spec), spec, d)(carry, d)


def run_stage(params, d: StageData, spec: Stage):
    """One stage of ``spec.steps`` Adam steps from prior parameters ``params`` (N, ...) over all
    N examples (vmapped per example under the "image" BatchNorm convention): jitted chunks of
    :data:`UNROLL` unrolled steps driven from the host. Returns (params, best image (N, H, W, C),
    best found (N,) bool, last image (N, H, W, C), last probs (N, C)); "best" is the lowest-loss
    iterate that reaches the target with ``config.margin``."""
    carry = _begin_jit(params, d, spec=spec)
    for n in chunk_lengths(spec.steps, UNROLL):
        carry = _chunk_jit(carry, d, spec=spec, length=n)
    return _end_jit(carry, d, spec=spec)


@partial(jax.jit, static_argnames=("prior", "steps", "lr", "mesh"))
def _fit_jit(params, aux, xq, prior, steps: int, lr: float, mesh=None):
    return per_example(lambda p, a, q: priors_lib.fit_to_query(prior, p, a, q, steps, lr), 0, mesh)(params, aux, xq)


@partial(jax.jit, static_argnames=("prior", "mesh"))
def _init_jit(keys, xq, prior, mesh=None):
    # A loop over the queries (lax.map), not vmap: the same values, and XLA compiles the random
    # initialisers of one generator instead of their batched form, in half the time (a DIP prior:
    # 16 s -> 8 s on 2 loaded cores; the work itself is negligible either way).
    return per_slice(lambda k, q: jax.lax.map(lambda a: prior.init(*a), (k, q)), (True, True), mesh)(keys, xq)


@partial(jax.jit, static_argnames=("apply_fn", "apply_kwargs", "feature_layer"))
def _capture_jit(variables, x, apply_fn, apply_kwargs, feature_layer):
    cap = capture(apply_fn, variables, x, apply_kwargs, feature_layer)
    return cap.logits, cap.features


def _bn_input_shapes(apply_fn, variables, x, apply_kwargs) -> list[tuple[int, ...]]:
    """Shapes of the BatchNorm inputs (features last) of one classifier call, without running it.

    ``x`` is a shape (a ``jax.ShapeDtypeStruct``), not data: slicing one query out of a batch
    sharded over host devices would be a cross-device computation (an all-reduce) for nothing,
    and XLA:CPU aborts a collective whose participants do not all arrive within its timeout."""
    shapes = jax.eval_shape(lambda v, xx: capture(apply_fn, v, xx, apply_kwargs, None).bn_inputs, variables, x)
    return [tuple(s.shape) for s in shapes]


def _freeze_kwargs(apply_kwargs) -> tuple:
    if apply_kwargs is None:
        return ()
    items = tuple(sorted(dict(apply_kwargs).items()))
    try:
        hash(items)
    except TypeError:
        raise CfjaxError("apply_kwargs values must be hashable (e.g. {'train': False})") from None
    return items


def _example_keys(key, n: int) -> jax.Array:
    """One key -> n split keys; n keys (typed (n,) or raw (n, 2)) are used as they are."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single_ndim = 0 if typed else 1
    if key.ndim == single_ndim:
        return jax.random.split(key, n)
    if key.ndim == single_ndim + 1 and key.shape[0] == n:
        return key
    raise CfjaxError(f"key must be one PRNG key or one per query ({n}), got shape {key.shape}")


def predict_proba(apply_fn: Callable, variables: Any, x: jax.Array, apply_kwargs: dict | None = None) -> jax.Array:
    """softmax(apply_fn(variables, x, **apply_kwargs)): (N, H, W, C) -> (N, num_classes)."""
    logits, _ = _capture_jit(variables, jnp.asarray(x), apply_fn, _freeze_kwargs(apply_kwargs), None)
    return jax.nn.softmax(logits, -1)


def _check_bn_layers(bn_shapes: list, cfg: DISCConfig) -> None:
    """Refuse a BatchNorm-statistics term the classifier's BatchNorm layers cannot give."""
    if cfg.lambda_bn <= 0:
        return
    if not bn_shapes:
        raise CfjaxError("the classifier has no BatchNorm layers; set lambda_bn to 0", argument="lambda_bn")
    if cfg.bn_convention == "image" and all(len(s) <= 2 for s in bn_shapes):
        raise CfjaxError("the classifier's BatchNorm layers have no spatial axes, so per-image statistics are undefined; "
                         "use bn_convention 'batch' or set lambda_bn to 0", argument="lambda_bn")


def _duq_pair(duq) -> tuple:
    """(log_kernel_fn, duq_variables), or (None, None) without manifold consistency."""
    if duq is None:
        return None, None
    if not (isinstance(duq, tuple) and len(duq) == 2 and callable(duq[0])):
        raise CfjaxError("duq must be a pair (log_kernel_fn, duq_variables) with log_kernel_fn(duq_variables, x) -> log K (N, C)")
    return duq


def initialize(cfg: DISCConfig, xq: jax.Array, key: jax.Array | None = None) -> tuple:
    """(prior, params, aux, fit_mse) to start the stages from, for queries xq (N, H, W, C): the
    prior initialised per query (``key``: one PRNG key, split per query, default
    ``jax.random.key(cfg.seed)``; or one key per query) and, for a generator prior, fitted to the
    query first (fit_mse (N,); zeros otherwise). Coarse-to-fine starts on a half-resolution grid.
    Queries sharded along their batch axis over a mesh (:func:`cfjax.parallel.batch_mesh_of`)
    are initialised and fitted per device."""
    keys = _example_keys(jax.random.key(cfg.seed) if key is None else key, xq.shape[0])
    mesh = batch_mesh_of(xq)
    prior = cfg.make_prior()
    if cfg.coarse_to_fine:
        prior = dataclasses.replace(cast(priors_lib.Pixels, prior), factor=2)  # coarse_to_fine: pixels only
    params, aux = _init_jit(keys, xq, prior, mesh=mesh)
    fit_mse = jnp.zeros((xq.shape[0],), xq.dtype)
    if prior.needs_fit and cfg.fit_steps > 0:
        params, fit_mse = _fit_jit(params, aux, xq, prior, cfg.fit_steps, float(cfg.fit_lr or prior.default_lr), mesh=mesh)
    return prior, params, aux, fit_mse


def _stage_plan(cfg: DISCConfig) -> list[tuple[str, float, int]]:
    """The stages as (target-loss mode, target probability, steps): the progressive schedule or
    one cross-entropy stage (coarse-to-fine: that stage in two halves)."""
    if cfg.progressive:
        per = cfg.steps // len(cfg.stages)
        plan = [("prob", s, per + (1 if i < cfg.steps % len(cfg.stages) else 0)) for i, s in enumerate(cfg.stages)]
    else:
        plan = [("ce", 1.0, cfg.steps)]
    if cfg.coarse_to_fine and len(plan) == 1:
        mode, tp, st = plan[0]
        plan = [(mode, tp, max(1, st // 2)), (mode, tp, max(1, st - st // 2))]
    return plan


def generate(
    apply_fn: Callable,
    variables: Any,
    x,
    targets,
    config: DISCConfig = DISCConfig(),
    duq: tuple[Callable, Any] | None = None,
    key: jax.Array | None = None,
    apply_kwargs: dict | None = None,
) -> dict:
    """DISC counterfactuals of queries x (N, H, W, C) in [0, 1] towards ``targets`` (N,).

    apply_fn(variables, x, **apply_kwargs) -> logits (N, C) is the classifier (any Flax linen
    model in evaluation mode); ``duq = (log_kernel_fn, duq_variables)`` with
    log_kernel_fn(duq_variables, x) -> log K (N, C) (e.g. :func:`cfjax.models.duq.duq_log_kernel`
    with its config bound) enables manifold consistency. ``key``: one PRNG key (split per query;
    default ``jax.random.key(config.seed)``) or one key per query (N,). Queries, targets and
    keys passed as jax Arrays keep their placement, so a batch sharded over a ``Mesh`` (see
    cfjax.pipelines.sharding) runs data-parallel under the same jits.

    Returns a dict of arrays: x_cf (N, H, W, C) (the best iterate reaching the target with
    margin in the latest stage that had one, else the last iterate); trajectory (S, N, H, W, C)
    (one image per stage / phase, same rule per stage); stage_success (S, N) bool; success (N,)
    bool; y_pred, y_cf_pred (N,) int32; p_pred (N,) (probability of y_pred on x); p_cf (N,)
    (probability of the target on x_cf); probs_cf (N, C); fit_mse (N,) (generator fit to the
    query; 0 for pixels).
    """

    cfg = config
    if not isinstance(cfg, DISCConfig):
        raise CfjaxError(f"config must be a DISCConfig, got {type(cfg).__name__}")
    xq = jnp.asarray(validate_images(x, None, "queries"))
    if isinstance(x, jax.Array) and x.dtype == jnp.float32:
        xq = x  # keep the caller's placement (e.g. a batch sharded over a Mesh)
    n = xq.shape[0]
    kw = _freeze_kwargs(apply_kwargs)
    use_feat = cfg.lambda_feat > 0
    logits_q, feats_q = _capture_jit(variables, xq, apply_fn, kw, cfg.feature_layer if use_feat else None)
    bn_shapes = _bn_input_shapes(apply_fn, variables, jax.ShapeDtypeStruct((1, *xq.shape[1:]), xq.dtype), kw)
    num_classes = logits_q.shape[-1]
    t = jnp.asarray(validate_targets(targets, num_classes, n))
    if isinstance(targets, jax.Array) and targets.dtype == jnp.int32 and targets.shape == (n,):
        t = targets  # keep the caller's placement
    _check_bn_layers(bn_shapes, cfg)
    kernel_fn, duq_vars = _duq_pair(duq)
    probs_q = jax.nn.softmax(logits_q, -1)
    prior, params, aux, fit_mse = initialize(cfg, xq, key)
    mesh = batch_mesh_of(xq)
    lr = float(cfg.lr or prior.default_lr)

    traj, found_all = [], []
    x_cf = found_any = None
    for i, (mode, tp, st) in enumerate(_stage_plan(cfg)):
        if cfg.coarse_to_fine and i == 1:
            prior = dataclasses.replace(prior, factor=1)
            params, aux = _refine_jit(params, aux, prior, mesh=mesh)
        spec = make_stage(apply_fn, cfg, prior, mode=mode, steps=st, lr=lr, apply_kwargs=apply_kwargs, log_kernel_fn=kernel_fn,
                          mesh=mesh)
        data = StageData(aux, xq, feats_q, t, jnp.float32(tp), variables, duq_vars)
        params, best_x, found, last_x, _ = run_stage(params, data, spec)
        stage_x = jnp.where(_expand(found, best_x), best_x, last_x)
        traj.append(stage_x)
        found_all.append(found)
        if x_cf is None:
            x_cf, found_any = stage_x, found
        else:
            # A later stage replaces x_cf where it reached the target, or where nothing has yet.
            take = found | ~found_any
            x_cf = jnp.where(_expand(take, stage_x), stage_x, x_cf)
            found_any = found_any | found
    out = {"x_cf": x_cf, "trajectory": jnp.stack(traj), "stage_success": jnp.stack(found_all), "fit_mse": fit_mse}
    return _with_predictions(out, predict_proba(apply_fn, variables, x_cf, dict(kw)), probs_q, t, cfg.margin)


def _with_predictions(out: dict, probs_cf: jax.Array, probs_q: jax.Array, t: jax.Array, margin: float) -> dict:
    """``out`` plus the classifier's view of queries and counterfactuals (see :func:`generate`)."""
    return {
        "x_cf": out["x_cf"],
        "trajectory": out["trajectory"],
        "stage_success": out["stage_success"],
        "success": reaches_target(probs_cf, t, margin),
        "y_pred": jnp.argmax(probs_q, -1).astype(jnp.int32),
        "p_pred": jnp.max(probs_q, -1),
        "y_target": t,
        "y_cf_pred": jnp.argmax(probs_cf, -1).astype(jnp.int32),
        "p_cf": jnp.take_along_axis(probs_cf, t[:, None], -1)[:, 0],
        "probs_cf": probs_cf,
        "fit_mse": out["fit_mse"],
    }


@partial(jax.jit, static_argnames=("fine", "mesh"))
def _refine_jit(params, aux, fine, mesh=None):
    return per_example(lambda p, a: fine.refine(p, a)[1:], 0, mesh)(params, aux)
