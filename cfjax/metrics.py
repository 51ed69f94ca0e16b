"""Counterfactual and heatmap metrics: pure, batched, jittable functions of arrays.

Images are ``(B, H, W, C)`` float32 in [0, 1] (NumPy or JAX arrays); class indices are ``(B,)``
ints. Every per-example metric takes ``reduce``: ``True`` (default) returns the mean over the
batch as a 0-d array, ``False`` returns the ``(B,)`` per-example values. Nothing here reads
files or models: models enter as callables ``fn(x (B, H, W, C)) -> (B, C)``.

Conventions (``cfjax evaluate`` prints them next to the numbers):

=========================  =============================================================
``proximity_l1``           mean over images of  sum_{h,w,c} |x_cf - x|   (the "L1" of
                           most papers; 0 .. H*W*C)
``proximity_l1_per_pixel`` mean over images of  mean_{h,w,c} |x_cf - x|  (0 .. 1)
``proximity_l2``           mean over images of  ||x_cf - x||_2 over all H*W*C values
``proximity_l2_per_pixel`` mean over images of  sqrt(mean_{h,w,c} (x_cf - x)^2) (RMS, 0 .. 1)
``sparsity``               fraction of the H*W pixels whose change (max over channels)
                           exceeds ``threshold``; lower = sparser
=========================  =============================================================

Realism: :func:`nearest_neighbour_distance` (L2 to the nearest real image of the target class),
:func:`pca_reconstruction_error` (L2 residual after projecting on the top-k principal
components of real images, :func:`fit_pca`), :func:`flow_bits_per_dim` (any bits/dim callable,
e.g. a trained flow). :func:`oracle_agreement` asks an independent classifier.

Stroke texture (does a counterfactual look drawn, like the real digits, or speckled / smudged?),
measured on each image's channel mean, each compared with the same number for real images:
:func:`grey_share` (share of the inked pixels that are grey rather than solid), :func:`laplacian_energy`
(high-frequency energy relative to the image's), :func:`isolated_ink` (lone bright pixels per image).

Heatmap quality: :func:`deletion_curve` / :func:`insertion_curve` (pixels removed/inserted in
heatmap order, area under the class-probability curve) and the baseline attributions
:func:`gradient_saliency`, :func:`gradient_x_input`, :func:`integrated_gradients`.
FakeMNIST ground truth: :func:`marker_mass`.
The ECINN authors' evaluation study: :func:`elastic_net`, :func:`im1`, :func:`im2` (with the
autoencoders of :mod:`cfjax.models.autoencoder`) and :func:`frechet_distance` (FID's formula, on
any features).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfjax.errors import CfjaxError
from cfjax.validation import positive_int

Array = jax.Array


# --------------------------------------------------------------------------------------------
# helpers


def _images(x, what: str) -> Array:
    if np.ndim(x) != 4:
        raise CfjaxError(f"{what} must have shape (B, H, W, C), got shape {np.shape(x)}")
    return jnp.asarray(x, jnp.float32)


def _pair(x, x_cf) -> tuple[Array, Array]:
    x, x_cf = _images(x, "x"), _images(x_cf, "x_cf")
    if x.shape != x_cf.shape:
        raise CfjaxError(f"x and x_cf must have the same shape, got {x.shape} and {x_cf.shape}")
    return x, x_cf


def _classes(c, n: int, what: str) -> Array:
    """Class indices: a scalar (broadcast) or (n,) ints -> (n,) int32."""
    c = jnp.asarray(c)
    if not jnp.issubdtype(c.dtype, jnp.integer):
        raise CfjaxError(f"{what} must be integer class indices, got dtype {c.dtype}")
    if c.ndim == 0:
        c = jnp.broadcast_to(c, (n,))
    if c.shape != (n,):
        raise CfjaxError(f"{what} must have shape ({n},) to match the images, got {c.shape}")
    return c.astype(jnp.int32)


def _reduce(v: Array, reduce: bool) -> Array:
    return jnp.mean(v) if reduce else v


def _heatmap_2d(h, x_shape: tuple, what: str = "heatmap") -> Array:
    """(B, H, W) as is, or (B, H, W, C) summed over channels -> (B, H, W) float32."""
    h = jnp.asarray(h, jnp.float32)
    b, hh, ww, cc = x_shape
    if h.shape == (b, hh, ww, cc):
        return jnp.sum(h, -1)
    if h.shape != (b, hh, ww):
        raise CfjaxError(f"{what} must have shape {(b, hh, ww)} (or {(b, hh, ww, cc)}) to match the images, got {h.shape}")
    return h


def batched_apply(fn: Callable, x, batch_size: int | None = 256):
    """``fn`` over ``x`` (N, ...) in chunks of ``batch_size`` (last chunk padded: one compiled shape).

    Returns the concatenated NumPy output (a pytree of arrays with leading axis N). Use it to
    bound memory when ``fn`` is a model; ``batch_size=None`` runs one call.
    """
    from cfjax.batching import map_chunks

    x = np.asarray(x)
    n = x.shape[0]
    return map_chunks(lambda xb: fn(jnp.asarray(xb)), (x,), n if batch_size is None else min(batch_size, max(n, 1)))


# --------------------------------------------------------------------------------------------
# validity, proximity, sparsity, runtime


def validity(y_cf_pred, y_target, reduce: bool = True) -> Array:
    """Fraction of counterfactuals the explained model assigns to the target class.

    y_cf_pred, y_target: (B,) ints. Returns a 0-d float (or (B,) 0/1 when ``reduce=False``).
    """
    y_cf_pred = jnp.asarray(y_cf_pred)
    if y_cf_pred.ndim != 1:
        raise CfjaxError(f"y_cf_pred must have shape (B,), got {y_cf_pred.shape}")
    y_target = _classes(y_target, y_cf_pred.shape[0], "y_target")
    return _reduce((y_cf_pred == y_target).astype(jnp.float32), reduce)


def proximity_l1(x, x_cf, reduce: bool = True) -> Array:
    """L1 distance summed over all H*W*C values of each image; mean over images.

    x, x_cf: (B, H, W, C). Returns 0-d (or (B,)). See :func:`proximity_l1_per_pixel` for the
    per-value mean (this value divided by H*W*C).
    """
    x, x_cf = _pair(x, x_cf)
    return _reduce(jnp.sum(jnp.abs(x_cf - x), axis=(1, 2, 3)), reduce)


def proximity_l1_per_pixel(x, x_cf, reduce: bool = True) -> Array:
    """Mean absolute change per pixel value (mean over H*W*C) of each image; mean over images."""
    x, x_cf = _pair(x, x_cf)
    return _reduce(jnp.mean(jnp.abs(x_cf - x), axis=(1, 2, 3)), reduce)


def proximity_l2(x, x_cf, reduce: bool = True) -> Array:
    """Euclidean norm of x_cf - x over all H*W*C values of each image; mean over images."""
    x, x_cf = _pair(x, x_cf)
    return _reduce(jnp.sqrt(jnp.sum(jnp.square(x_cf - x), axis=(1, 2, 3))), reduce)


def proximity_l2_per_pixel(x, x_cf, reduce: bool = True) -> Array:
    """Root-mean-square change per pixel value of each image (L2 / sqrt(H*W*C)); mean over images."""
    x, x_cf = _pair(x, x_cf)
    return _reduce(jnp.sqrt(jnp.mean(jnp.square(x_cf - x), axis=(1, 2, 3))), reduce)


def sparsity(x, x_cf, threshold: float = 0.1, reduce: bool = True) -> Array:
    """Fraction of the H*W pixels changed by more than ``threshold`` (max |change| over channels).

    x, x_cf: (B, H, W, C). Lower is sparser. Returns 0-d (or (B,)).
    """
    x, x_cf = _pair(x, x_cf)
    changed = jnp.max(jnp.abs(x_cf - x), axis=-1) > threshold
    return _reduce(jnp.mean(changed.astype(jnp.float32), axis=(1, 2)), reduce)


# --------------------------------------------------------------------------------------------
# stroke texture


def _grey(x) -> Array:
    """(B, H, W): the channel mean of images (B, H, W, C)."""
    return jnp.mean(_images(x, "x_cf"), axis=-1)


def _neighbours(g: Array) -> tuple[Array, ...]:
    """The 8 neighbours of every pixel of g (B, H, W), zero outside the image."""
    p = jnp.pad(g, ((0, 0), (1, 1), (1, 1)))
    h, w = g.shape[1:]
    return tuple(p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def grey_share(x_cf, ink: float = 0.2, solid: float = 0.8, reduce: bool = True) -> Array:
    """Share of the inked pixels (value > ``ink``) that are grey (value < ``solid``), per image
    (0 for an image without ink). Pen strokes on MNIST: ~0.36; smudges and faded digits: more."""
    g = _grey(x_cf)
    inked = g > ink
    grey = inked & (g < solid)
    return _reduce(jnp.sum(grey, (1, 2)) / jnp.maximum(jnp.sum(inked, (1, 2)), 1), reduce)


def laplacian_energy(x_cf, reduce: bool = True) -> Array:
    """sum (4-neighbour Laplacian)^2 / sum x^2 per image (zero outside the image; 0 for a blank
    image). Smooth strokes keep it low (MNIST test digits ~1.4); speckle and checkerboards raise it
    (a lone pixel: 20, a checkerboard: 32 away from the border)."""
    g = _grey(x_cf)
    n = _neighbours(g)
    lap = 4.0 * g - n[1] - n[3] - n[4] - n[6]  # up, left, right, down
    return _reduce(jnp.sum(lap**2, (1, 2)) / jnp.maximum(jnp.sum(g**2, (1, 2)), 1e-12), reduce)


def isolated_ink(x_cf, on: float = 0.3, off: float = 0.15, reduce: bool = True) -> Array:
    """Lone bright pixels per image: value > ``on`` while the mean of its 8 neighbours is < ``off``
    (MNIST test digits ~0.07 per image)."""
    g = _grey(x_cf)
    around = sum(_neighbours(g)) / 8.0
    return _reduce(jnp.sum((g > on) & (around < off), (1, 2)).astype(jnp.float32), reduce)


TEXTURE = ("grey_share", "laplacian_energy", "isolated_ink")


def stroke_texture(x, reduce: bool = True) -> dict[str, Array]:
    """``{name: value}`` for the three texture metrics (:data:`TEXTURE`) of images x (B, H, W, C)."""
    return {name: globals()[name](x, reduce=reduce) for name in TEXTURE}


def runtime_per_counterfactual(seconds, n: int) -> float:
    """Wall time per counterfactual: ``seconds / n`` (``seconds`` for the whole batch of ``n``)."""
    seconds = float(np.asarray(seconds))
    if not np.isfinite(seconds) or seconds < 0:
        raise CfjaxError(f"seconds must be a finite non-negative number, got {seconds}")
    return seconds / positive_int(int(n), "number of counterfactuals")


# --------------------------------------------------------------------------------------------
# realism


def nearest_neighbour_distance(
    x_cf, reference_images, reference_labels=None, y_target=None, chunk_size: int = 1024, reduce: bool = True
) -> Array:
    """L2 distance from each counterfactual to the nearest reference image of its target class.

    x_cf: (B, H, W, C); reference_images: (N, H, W, C); reference_labels: (N,) ints;
    y_target: (B,) ints (or a scalar). With ``y_target=None`` the nearest reference of any class
    counts. References are scanned ``chunk_size`` at a time, so memory is O(B * chunk_size)
    however large N is; the winner's distance is recomputed exactly from the difference. A
    target class with no reference image gives ``inf``. Returns 0-d (or (B,)).
    """
    q = _images(x_cf, "x_cf")
    r = _images(reference_images, "reference_images")
    if q.shape[1:] != r.shape[1:]:
        raise CfjaxError(f"reference images are {tuple(r.shape[1:])} per image but x_cf are {tuple(q.shape[1:])}")
    b, n = q.shape[0], r.shape[0]
    if n == 0:
        raise CfjaxError("reference_images is empty")
    positive_int(chunk_size, "chunk_size")
    if y_target is None:
        labels = jnp.zeros((n,), jnp.int32)
        target = jnp.zeros((b,), jnp.int32)
    else:
        if reference_labels is None:
            raise CfjaxError("reference_labels are needed to compare with the target class")
        labels = _classes(reference_labels, n, "reference_labels")
        target = _classes(y_target, b, "y_target")
    return _reduce(_nn_distance(q.reshape(b, -1), r.reshape(n, -1), labels, target, int(min(chunk_size, n))), reduce)


@jax.jit
def _nn_core(q, chunks, label_chunks, valid_chunks, target):
    q_sq = jnp.sum(q * q, -1)

    def body(carry, inp):
        best, best_idx = carry
        r, lab, valid, offset = inp
        d2 = q_sq[:, None] + jnp.sum(r * r, -1)[None, :] - 2.0 * jnp.dot(q, r.T, precision=jax.lax.Precision.HIGHEST)
        ok = valid[None, :] & (lab[None, :] == target[:, None])
        d2 = jnp.where(ok, d2, jnp.inf)
        i = jnp.argmin(d2, axis=1)
        m = jnp.take_along_axis(d2, i[:, None], 1)[:, 0]
        better = m < best
        return (jnp.where(better, m, best), jnp.where(better, offset + i, best_idx)), None

    k = chunks.shape[1]
    offsets = jnp.arange(chunks.shape[0], dtype=jnp.int32) * k
    init = (jnp.full(q.shape[:1], jnp.inf, q.dtype), jnp.zeros(q.shape[:1], jnp.int32))
    (best, best_idx), _ = jax.lax.scan(body, init, (chunks, label_chunks, valid_chunks, offsets))
    return best, best_idx


def _nn_distance(q: Array, r: Array, labels: Array, target: Array, k: int) -> Array:
    n = r.shape[0]
    pad = (-n) % k
    rp = jnp.pad(r, ((0, pad), (0, 0)))
    lp = jnp.pad(labels, (0, pad), constant_values=-1)
    vp = jnp.arange(n + pad) < n
    best, idx = _nn_core(q, rp.reshape(-1, k, r.shape[1]), lp.reshape(-1, k), vp.reshape(-1, k), target)
    exact = jnp.sqrt(jnp.sum(jnp.square(q - rp[idx]), -1))
    return jnp.where(jnp.isfinite(best), exact, jnp.inf)


class PCA(NamedTuple):
    """Principal components of a set of images (a pytree: jittable)."""

    mean: Array                 # (D,) with D = H*W*C
    components: Array           # (k, D) orthonormal rows, largest variance first
    explained_variance: Array   # (k,)


def fit_pca(images, k: int) -> PCA:
    """Top-``k`` principal components of ``images`` (N, H, W, C) (exact SVD in float64)."""
    x = np.asarray(_images(images, "images"), np.float64)
    n = x.shape[0]
    x = x.reshape(n, -1)
    d = x.shape[1]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= min(n, d):
        raise CfjaxError(f"PCA needs 1 <= k <= min(N, D) = {min(n, d)}, got k={k!r}")
    mean = x.mean(0)
    c = x - mean
    if n >= d:  # eigenvectors of the D x D scatter matrix: cheaper than an SVD of N x D
        evals, evecs = np.linalg.eigh(c.T @ c)
        top = np.argsort(evals)[::-1][:k]
        comps, sq = evecs[:, top].T, np.maximum(evals[top], 0.0)
    else:
        _, s, vt = np.linalg.svd(c, full_matrices=False)
        comps, sq = vt[:k], s[:k] ** 2
    var = sq / max(n - 1, 1)
    return PCA(jnp.asarray(mean, jnp.float32), jnp.asarray(comps, jnp.float32), jnp.asarray(var, jnp.float32))


def pca_reconstruction_error(x, pca: PCA, reduce: bool = True) -> Array:
    """L2 norm of what the top-k components of real images cannot explain in each image.

    ``|| (x - mean) - V^T V (x - mean) ||_2`` over all H*W*C values; x: (B, H, W, C). Images
    off the data manifold leave a larger residual. Returns 0-d (or (B,)).
    """
    x = _images(x, "x")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] != pca.mean.shape[0]:
        raise CfjaxError(f"images have {flat.shape[1]} values each but the PCA was fitted on {pca.mean.shape[0]}")
    c = flat - pca.mean
    hi = jax.lax.Precision.HIGHEST
    recon = jnp.dot(jnp.dot(c, pca.components.T, precision=hi), pca.components, precision=hi)
    return _reduce(jnp.sqrt(jnp.sum(jnp.square(c - recon), -1)), reduce)


def flow_bits_per_dim(bpd_fn: Callable, x, batch_size: int | None = 256, reduce: bool = True):
    """Bits/dim of each image under a density model: ``bpd_fn(x (B, H, W, C)) -> (B,)``.

    e.g. ``lambda x: flow_classifier.nll_bits_per_dim(params, config, x)`` (jit it). Lower means
    more likely under the model. Runs in chunks of ``batch_size``. Returns 0-d (or (B,)).
    """
    x = _images(x, "x")
    v = jnp.asarray(batched_apply(bpd_fn, x, batch_size))
    if v.shape != (x.shape[0],):
        raise CfjaxError(f"bits/dim function must return shape ({x.shape[0]},), got {v.shape}")
    return _reduce(v, reduce)


def oracle_agreement(oracle_predict: Callable, x_cf, y_target, batch_size: int | None = 256, reduce: bool = True):
    """Fraction of counterfactuals an independent oracle classifier assigns to the target class.

    ``oracle_predict(x (B, H, W, C))`` returns logits/probabilities (B, C) (argmax taken) or
    class indices (B,). x_cf: (B, H, W, C); y_target: (B,). Returns 0-d (or (B,) 0/1).
    """
    x_cf = _images(x_cf, "x_cf")
    target = _classes(y_target, x_cf.shape[0], "y_target")
    out = jnp.asarray(batched_apply(oracle_predict, x_cf, batch_size))
    if out.ndim == 2 and out.shape[0] == x_cf.shape[0]:
        pred = jnp.argmax(out, -1)
    elif out.shape == (x_cf.shape[0],):
        pred = out
    else:
        raise CfjaxError(f"oracle must return (B, C) scores or (B,) classes for B={x_cf.shape[0]}, got {out.shape}")
    return _reduce((pred == target).astype(jnp.float32), reduce)


# --------------------------------------------------------------------------------------------
# heatmap quality: deletion / insertion


class HeatmapCurve(NamedTuple):
    """A deletion or insertion curve (a pytree: jittable)."""

    fractions: Array  # (S+1,) fraction of the H*W pixels removed/inserted, 0 .. 1
    probs: Array      # (B, S+1) probability of the class at each fraction
    auc: Array        # (B,) trapezoid area under probs over fractions


def _pixel_ranks(h: Array) -> Array:
    """(B, P) scores -> rank of each pixel when sorted by decreasing score (0 = most important)."""
    order = jnp.argsort(-h, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def _curve(predict_proba_fn, x, heatmap, target_class, steps: int, baseline, insert: bool) -> HeatmapCurve:
    x = _images(x, "x")
    b, hh, ww, cc = x.shape
    h = _heatmap_2d(heatmap, x.shape).reshape(b, hh * ww)
    cls = _classes(target_class, b, "target_class")
    positive_int(steps, "steps")
    base = jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)
    p = hh * ww
    counts_np = np.round(np.arange(steps + 1) * p / steps).astype(np.int32)
    counts = jnp.asarray(counts_np)
    ranks = _pixel_ranks(h).reshape(b, hh, ww, 1)

    def prob_at(n):
        first = ranks < n  # the n most important pixels
        xk = jnp.where(first, x, base) if insert else jnp.where(first, base, x)
        probs = predict_proba_fn(xk)
        return jnp.take_along_axis(probs, cls[:, None], 1)[:, 0]

    probs = jax.lax.map(prob_at, counts).T  # (B, S+1), one model call per step
    fr = jnp.asarray(counts_np / p, jnp.float32)
    auc = jnp.sum(0.5 * (probs[:, 1:] + probs[:, :-1]) * (fr[1:] - fr[:-1]), -1)
    return HeatmapCurve(fr, probs, auc)


def deletion_curve(predict_proba_fn: Callable, x, heatmap, target_class, steps: int = 20, baseline=0.0) -> HeatmapCurve:
    """Remove pixels in decreasing heatmap order and record the probability of ``target_class``.

    predict_proba_fn: (B, H, W, C) -> (B, C) probabilities; x: (B, H, W, C); heatmap: (B, H, W)
    (or (B, H, W, C), summed over channels); target_class: (B,) or scalar. At step k the
    round(k * H*W / steps) highest-scoring pixels (all channels) are replaced by ``baseline``
    (a scalar or an array broadcastable to x, e.g. a blurred copy). A good heatmap makes the
    probability fall fast: lower AUC is better. Ties keep pixel order. Jittable (``steps``
    static); one model call per step on the whole batch (``lax.map``), no loop over examples.
    """
    return _curve(predict_proba_fn, x, heatmap, target_class, steps, baseline, insert=False)


def insertion_curve(predict_proba_fn: Callable, x, heatmap, target_class, steps: int = 20, baseline=0.0) -> HeatmapCurve:
    """Start from ``baseline`` and insert the pixels of x in decreasing heatmap order.

    Same arguments as :func:`deletion_curve`. A good heatmap makes the probability rise fast:
    higher AUC is better.
    """
    return _curve(predict_proba_fn, x, heatmap, target_class, steps, baseline, insert=True)


# --------------------------------------------------------------------------------------------
# baseline attributions


def _class_grad(logits_fn: Callable, x: Array, cls: Array) -> Array:
    def picked(xx):
        return jnp.sum(jnp.take_along_axis(logits_fn(xx), cls[:, None], 1))

    return jax.grad(picked)(x)


def gradient_saliency(logits_fn: Callable, x, cls) -> Array:
    """Vanilla gradient saliency (Simonyan et al.): max over channels of |d logit_cls / d x|.

    logits_fn: (B, H, W, C) -> (B, C), differentiable, examples independent of each other (e.g.
    BatchNorm in eval mode). x: (B, H, W, C); cls: (B,) or scalar. Returns (B, H, W) >= 0.
    """
    x = _images(x, "x")
    g = _class_grad(logits_fn, x, _classes(cls, x.shape[0], "cls"))
    return jnp.max(jnp.abs(g), -1)


def gradient_x_input(logits_fn: Callable, x, cls) -> Array:
    """Gradient times input: (d logit_cls / d x) * x, signed, shape (B, H, W, C)."""
    x = _images(x, "x")
    return _class_grad(logits_fn, x, _classes(cls, x.shape[0], "cls")) * x


def integrated_gradients(logits_fn: Callable, x, cls, steps: int = 32, baseline=0.0) -> Array:
    """Integrated gradients (Sundararajan et al.) of logit ``cls`` from ``baseline`` to x.

    ``(x - x0) * mean_k grad(x0 + a_k (x - x0))`` with midpoints a_k = (k + 1/2) / steps; the
    attributions of an image sum to about logit(x) - logit(x0) (completeness). x: (B, H, W, C);
    baseline: scalar or broadcastable to x. Returns (B, H, W, C), signed. Memory is that of one
    gradient: the path is scanned (``lax.scan``).
    """
    x = _images(x, "x")
    cls = _classes(cls, x.shape[0], "cls")
    positive_int(steps, "steps")
    x0 = jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps

    def body(acc, a):
        return acc + _class_grad(logits_fn, x0 + a * (x - x0), cls), None

    total, _ = jax.lax.scan(body, jnp.zeros_like(x), alphas)
    return (x - x0) * total / steps


# --------------------------------------------------------------------------------------------
# FakeMNIST ground truth


def marker_mass(heatmap_or_change, classes, column: int = 0, reduce: bool = True) -> Array:
    """Fraction of a heatmap's mass that lies on the FakeMNIST marker pixels of ``classes``.

    FakeMNIST marks class c by the pixel (row c, column ``column``). heatmap_or_change:
    (B, H, W) or (B, H, W, C) (e.g. x_cf - x); its absolute value, summed over channels, is the
    mass. classes: (B,) or (B, K) (e.g. stacked true and target class: a correct
    counterfactual turns one marker off and the other on); the union of their marker pixels
    counts. 1 = all mass on the markers; 0 when the heatmap is all zero. Returns 0-d (or (B,)).
    """
    h = jnp.asarray(heatmap_or_change, jnp.float32)
    if h.ndim == 4:
        h = jnp.sum(jnp.abs(h), -1)
    elif h.ndim == 3:
        h = jnp.abs(h)
    else:
        raise CfjaxError(f"heatmap must have shape (B, H, W) or (B, H, W, C), got {h.shape}")
    b, hh, ww = h.shape
    c = jnp.asarray(classes)
    if not jnp.issubdtype(c.dtype, jnp.integer):
        raise CfjaxError(f"classes must be integer class indices, got dtype {c.dtype}")
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[0] != b:
        raise CfjaxError(f"classes must have shape ({b},) or ({b}, K), got {c.shape}")
    if not 0 <= column < ww:
        raise CfjaxError(f"marker column {column} is outside the image width {ww}")
    rows = jnp.arange(hh)
    on_row = jnp.any(rows[None, :, None] == c[:, None, :], -1)  # (B, H)
    mask = on_row[:, :, None] & (jnp.arange(ww) == column)[None, None, :]
    total = jnp.sum(h, (1, 2))
    on_marker = jnp.sum(jnp.where(mask, h, 0.0), (1, 2))
    return _reduce(jnp.where(total > 0, on_marker / jnp.where(total > 0, total, 1.0), 0.0), reduce)


# --------------------------------------------------------------------------------------------
# the ECINN authors' evaluation study (Hvilshoj et al., arXiv 2111.00177)


def elastic_net(x, x_cf, reduce: bool = True) -> Array:
    """||x_cf - x||_1 + ||x_cf - x||_2 over all H*W*C values (as the study's code computes it:
    the L2 norm, not its square). x, x_cf: (B, H, W, C). Returns 0-d (or (B,))."""
    x, x_cf = _pair(x, x_cf)
    d = (x_cf - x).reshape(x.shape[0], -1)
    return _reduce(jnp.sum(jnp.abs(d), 1) + jnp.sqrt(jnp.sum(d * d, 1)), reduce)


def im1(x_cf, rec_target, rec_source, eps: float = 1e-5, reduce: bool = True) -> Array:
    """IM1 = ||x_cf - AE_t(x_cf)||^2 / (||x_cf - AE_s(x_cf)||^2 + eps): below 1 when the target
    class's autoencoder reconstructs the counterfactual better than the source class's.
    All three (B, H, W, C); the reconstructions come from :mod:`cfjax.models.autoencoder`."""
    x_cf, rec_target = _pair(x_cf, rec_target)
    _, rec_source = _pair(x_cf, rec_source)
    num = jnp.sum(jnp.square(x_cf - rec_target), (1, 2, 3))
    return _reduce(num / (jnp.sum(jnp.square(x_cf - rec_source), (1, 2, 3)) + eps), reduce)


def im2(x_cf, rec_target, rec_all, eps: float = 1e-5, reduce: bool = True) -> Array:
    """IM2 = ||AE_t(x_cf) - AE_all(x_cf)||^2 / (||x_cf||_1 + eps): near 0 when the target class's
    autoencoder and the all-class one agree on the counterfactual. All three (B, H, W, C)."""
    x_cf, rec_target = _pair(x_cf, rec_target)
    _, rec_all = _pair(x_cf, rec_all)
    num = jnp.sum(jnp.square(rec_target - rec_all), (1, 2, 3))
    return _reduce(num / (jnp.sum(jnp.abs(x_cf), (1, 2, 3)) + eps), reduce)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fit to two feature sets (N, D) and (M, D):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the formula of FID (float64, NumPy;
    the matrix square root from the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which are real
    and non-negative)."""
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise CfjaxError(f"features must be (N, D) and (M, D) with N, M >= 2, got {a.shape} and {b.shape}")
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    mean = np.sum(np.square(a.mean(0) - b.mean(0)))
    return float(mean + np.trace(sa) + np.trace(sb) - 2 * np.sum(np.sqrt(np.clip(cross, 0, None))))


__all__ = [
    "HeatmapCurve",
    "PCA",
    "batched_apply",
    "deletion_curve",
    "elastic_net",
    "fit_pca",
    "flow_bits_per_dim",
    "frechet_distance",
    "gradient_saliency",
    "gradient_x_input",
    "grey_share",
    "im1",
    "im2",
    "insertion_curve",
    "integrated_gradients",
    "isolated_ink",
    "laplacian_energy",
    "marker_mass",
    "nearest_neighbour_distance",
    "oracle_agreement",
    "pca_reconstruction_error",
    "proximity_l1",
    "proximity_l1_per_pixel",
    "proximity_l2",
    "proximity_l2_per_pixel",
    "runtime_per_counterfactual",
    "sparsity",
    "stroke_texture",
    "validity",
]
