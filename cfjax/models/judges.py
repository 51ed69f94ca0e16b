"""Judges of realism from model families other than CNNs, on raw pixels.

A counterfactual optimised against one CNN can fool another CNN trained on the same images (the
perturbation transfers), so cfjax also asks classifiers that share nothing with the explained
models:

- ``"rbf"``: an RBF-kernel classifier approximated by random Fourier features,
  ``phi(x) = sqrt(2/F) cos(x W + b)``, ``W ~ N(0, 1/sigma^2)``, ``b ~ U(0, 2 pi)``, with
  ``sigma`` the median pairwise distance of the training images, and ridge regression onto the
  one-hot labels (closed form): ``A = (Phi^T Phi + lambda I)^-1 Phi^T Y``.
- ``"knn"``: a k-nearest-neighbour vote (k = 5, inverse-distance weights) in the span of the
  first ``pca_dim`` principal components of the training images.

Both read pixels only: tiny adversarial-like changes barely move them, whereas a counterfactual
that redraws the digit does. Fitting takes seconds on a CPU; a fitted judge is a dict of arrays
(``fit_*`` returns it, ``predict`` applies it), savable with ``np.savez``.
"""

from __future__ import annotations

import numpy as np

from cfjax.errors import CfjaxError

KINDS = ("rbf", "knn")


def _flat(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x.reshape(x.shape[0], -1)


def fit_rbf(images, labels, num_classes: int, features: int = 4096, ridge: float = 1e-2, seed: int = 0) -> dict:
    """images (N, H, W, C) in [0, 1], labels (N,) -> judge dict (``kind = "rbf"``)."""
    x = _flat(images)
    rng = np.random.default_rng(seed)
    sub = x[rng.permutation(len(x))[:1000]]
    d2 = np.maximum(np.sum(sub**2, 1)[:, None] + np.sum(sub**2, 1)[None, :] - 2 * sub @ sub.T, 0)
    sigma = float(np.sqrt(np.median(d2[np.triu_indices(len(sub), 1)])))
    w = (rng.standard_normal((x.shape[1], features)) / sigma).astype(np.float32)
    b = rng.uniform(0, 2 * np.pi, features).astype(np.float32)
    phi = np.sqrt(2.0 / features) * np.cos(x @ w + b)
    y = np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]
    gram = phi.T.astype(np.float64) @ phi + ridge * len(x) / features * np.eye(features)
    a = np.linalg.solve(gram, phi.T.astype(np.float64) @ y).astype(np.float32)
    return {"kind": np.array("rbf"), "w": w, "b": b, "a": a}


def fit_knn(images, labels, num_classes: int, pca_dim: int = 50, k: int = 5) -> dict:
    """images (N, H, W, C) in [0, 1], labels (N,) -> judge dict (``kind = "knn"``)."""
    x = _flat(images)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:pca_dim].T.astype(np.float32)
    return {"kind": np.array("knn"), "mean": mean, "basis": basis, "train": (x - mean) @ basis,
            "labels": np.asarray(labels, np.int32), "k": np.array(k), "num_classes": np.array(num_classes)}


def fit(kind: str, images, labels, num_classes: int) -> dict:
    if kind not in KINDS:
        raise CfjaxError(f"unknown judge {kind!r}: choose one of {', '.join(KINDS)}")
    return (fit_rbf if kind == "rbf" else fit_knn)(images, labels, num_classes)


def scores(judge: dict, images, batch_size: int = 1000) -> np.ndarray:
    """Class scores (N, C) of images (N, H, W, C) in [0, 1] (higher = more that class)."""
    x = _flat(images)
    out = []
    kind = str(judge["kind"])
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if kind == "rbf":
            phi = np.sqrt(2.0 / judge["w"].shape[1]) * np.cos(xb @ judge["w"] + judge["b"])
            out.append(phi @ judge["a"])
        elif kind == "knn":
            q = (xb - judge["mean"]) @ judge["basis"]
            t = judge["train"]
            d2 = np.maximum(np.sum(q**2, 1)[:, None] + np.sum(t**2, 1)[None, :] - 2 * q @ t.T, 0)
            k = int(judge["k"])
            nn = np.argpartition(d2, k, axis=1)[:, :k]
            wts = 1.0 / (np.sqrt(np.take_along_axis(d2, nn, 1)) + 1e-6)
            votes = np.zeros((len(xb), int(judge["num_classes"])), np.float32)
            np.add.at(votes, (np.arange(len(xb))[:, None], judge["labels"][nn]), wts)
            out.append(votes)
        else:
            raise CfjaxError(f"not a judge (kind {kind!r})")
    return np.concatenate(out)


def features(judge: dict, images) -> np.ndarray:
    """The k-NN judge's PCA coordinates (N, pca_dim) of images (N, H, W, C): the feature space in
    which cfjax computes the Frechet distance of the evaluation study."""
    if str(judge["kind"]) != "knn":
        raise CfjaxError(f"features come from a knn judge, got kind {str(judge['kind'])!r}")
    return (_flat(images) - judge["mean"]) @ judge["basis"]


def predict(judge: dict, images) -> np.ndarray:
    """Predicted classes (N,) int."""
    return np.argmax(scores(judge, images), axis=1)
