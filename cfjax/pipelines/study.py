"""The ECINN authors' metric table (Hvilshoj et al., "On Quantitative Evaluations of
Counterfactuals", arXiv 2111.00177) for any set of counterfactuals, with 95% intervals.

    study_table(x, x_cf, source, cf_class, autoencoders, judge_knn, seed=0) -> dict

x, x_cf (N, H, W, C) in [0, 1]; source (N,) the explained model's class of x; cf_class (N,) its
class of x_cf. Columns: ``elastic_net`` (L1 + L2 of the change), ``im1`` and ``im2`` (with
cfjax's per-class autoencoders, :mod:`cfjax.models.autoencoder`; IM1 compares the cf-class
autoencoder with the source-class one, IM2 the cf-class one with the all-class one), ``fid``
(the Frechet distance between the queries and the counterfactuals in the k-NN judge's PCA space,
not the authors' CNN features: comparable between rows here, not with their absolute values).
Means come with normal 95% intervals, the Frechet distance with a bootstrap percentile interval.
The autoencoders and judges are fitted once and cached by the caller (:func:`cached_autoencoders`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from cfjax import metrics
from cfjax.models import autoencoder, judges


def cache_dir() -> Path:
    """Where fitted judges and autoencoders are kept: ``$CFJAX_CACHE`` or ``~/.cache/cfjax``."""
    return Path(os.environ.get("CFJAX_CACHE", Path.home() / ".cache" / "cfjax"))


def cached_autoencoders(images, labels, num_classes: int, name: str) -> dict:
    """Per-class + all-class autoencoders fit on (images, labels), cached as ``ae_<name>.msgpack``."""
    path = cache_dir() / f"ae_{name}.msgpack"
    if path.exists():
        return autoencoder.load(path)
    params = autoencoder.fit_autoencoders(images, labels, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    autoencoder.save(path, params)
    return params


def _mean_ci(v: np.ndarray | jax.Array) -> dict:
    v = np.asarray(v, np.float64)
    h = 1.96 * float(np.std(v, ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    m = float(np.mean(v))
    return {"mean": round(m, 4), "ci95": [round(m - h, 4), round(m + h, 4)], "n": int(len(v))}


def _fid_ci(fa: np.ndarray, fb: np.ndarray, seed: int, resamples: int = 100) -> dict:
    rng = np.random.default_rng(seed)
    boot = [metrics.frechet_distance(fa[i], fb[i]) for i in (rng.integers(0, len(fa), len(fa)) for _ in range(resamples))]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": round(metrics.frechet_distance(fa, fb), 3), "ci95": [round(float(lo), 3), round(float(hi), 3)],
            "n": int(len(fa))}


def study_table(x, x_cf, source, cf_class, autoencoders: dict, judge_knn: dict, seed: int = 0) -> dict:
    """The study's columns for one method's counterfactuals (shapes in the module docstring)."""
    x = np.asarray(x, np.float32)
    x_cf = np.asarray(x_cf, np.float32)
    source = np.asarray(source, np.int64)
    cf_class = np.asarray(cf_class, np.int64)
    all_class = autoencoder.count_of(autoencoders) - 1
    rec_cf = autoencoder.reconstruct(autoencoders, x_cf, cf_class)
    rec_src = autoencoder.reconstruct(autoencoders, x_cf, source)
    rec_all = autoencoder.reconstruct(autoencoders, x_cf, np.full(len(x_cf), all_class))
    return {
        "elastic_net": _mean_ci(metrics.elastic_net(x, x_cf, reduce=False)),
        "im1": _mean_ci(metrics.im1(x_cf, rec_cf, rec_src, reduce=False)),
        "im2": _mean_ci(metrics.im2(x_cf, rec_cf, rec_all, reduce=False)),
        "fid": _fid_ci(judges.features(judge_knn, x), judges.features(judge_knn, x_cf), seed),
    }

