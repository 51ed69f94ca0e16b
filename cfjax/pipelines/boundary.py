"""Decision-boundary experiment: do counterfactuals teach a surrogate the model's boundary?

The DISC paper's claim, as an experiment any explainer can be put through: take N queries x with
the explained model's labels F(x); add one perturbed image x' per query, labelled F(x'), made by

- ``counterfactual``: the explainer's counterfactual (x_cf, crossing the boundary on purpose);
- ``random``: x + a random Gaussian direction with the *same L2 norm* as x_cf - x (clipped to [0, 1]);
- ``adversarial``: targeted L2 PGD against F towards the same target class, with the same per-query
  L2 budget ||x_cf - x|| (clipped to [0, 1]);
- ``queries only``: no perturbation (N samples instead of 2N; the floor);

train the same small surrogate (softmax regression or a one-hidden-layer MLP, Adam, fixed
steps, several seeds) on each set, and measure its agreement with F on held-out images, clean
and corrupted (Gaussian noise, blur, low contrast). Everything here is a pure function of arrays
and a model function ``logits_fn(x (B, H, W, C)) -> (B, C)``; ``run_experiment`` ties them
together. ``examples/reproduce.py`` runs it for ECINN (explaining the flow) and DISC (explaining
the CNN).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfjax.batching import map_chunks
from cfjax.errors import CfjaxError
from cfjax.validation import positive_int

Array = jax.Array
SURROGATES = ("linear", "mlp")
CORRUPTIONS = ("clean", "noise", "blur", "contrast")


# --------------------------------------------------------------------------------------------
# perturbations with a matched budget


def _l2(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, -1) + 1e-12)


def random_perturbation(key: Array, x: Array, budget: Array) -> Array:
    """x (B, H, W, C) + a Gaussian direction scaled to L2 norm ``budget`` (B,), clipped to [0, 1]."""
    d = jax.random.normal(key, x.shape)
    d = d * (budget / _l2(d))[:, None, None, None]
    return jnp.clip(x + d, 0.0, 1.0)


def pgd_l2(logits_fn: Callable, x: Array, target: Array, budget: Array, steps: int = 10) -> Array:
    """Targeted L2 projected gradient descent towards ``target`` (B,) within ``budget`` (B,).

    Each step moves 2.5 * budget / steps along the normalised gradient of -CE(target), then
    projects back onto the L2 ball of radius ``budget`` around x and onto [0, 1].
    x (B, H, W, C) -> (B, H, W, C).
    """
    positive_int(steps, "PGD steps")
    eta = 2.5 * budget / steps

    def ce(xa):
        logp = jax.nn.log_softmax(logits_fn(xa), -1)
        return -jnp.sum(jnp.take_along_axis(logp, target[:, None], -1))

    def step(_, xa):
        g = jax.grad(ce)(xa)
        xa = xa - (eta / _l2(g))[:, None, None, None] * g
        d = xa - x
        scale = jnp.minimum(1.0, budget / _l2(d))
        return jnp.clip(x + d * scale[:, None, None, None], 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, step, x)


# --------------------------------------------------------------------------------------------
# corruptions (held-out test images under shift)


def corrupt(x: Array, kind: str, key: Array | None = None, severity: float = 1.0) -> Array:
    """Corrupted copies of x (B, H, W, C) in [0, 1]: ``clean``, ``noise`` (Gaussian, sigma 0.3 *
    severity), ``blur`` (Gaussian kernel, sigma 1 * severity) or ``contrast`` (pixels pulled to
    the image mean, factor 1 - 0.6 * severity). Returns (B, H, W, C) in [0, 1]."""
    if kind == "clean":
        return x
    if kind == "noise":
        key = jax.random.PRNGKey(0) if key is None else key
        return jnp.clip(x + 0.3 * severity * jax.random.normal(key, x.shape), 0.0, 1.0)
    if kind == "blur":
        s = 1.0 * severity
        r = jnp.arange(-2, 3, dtype=jnp.float32)
        k1 = jnp.exp(-0.5 * (r / s) ** 2)
        k1 = k1 / jnp.sum(k1)
        c = x.shape[-1]
        k = jnp.tile((k1[:, None] * k1[None, :])[:, :, None, None], (1, 1, 1, c))  # HWIO, depthwise
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        return jnp.clip(y, 0.0, 1.0)
    if kind == "contrast":
        f = 1.0 - 0.6 * severity
        m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        return jnp.clip((x - m) * f + m, 0.0, 1.0)
    raise CfjaxError(f"unknown corruption {kind!r}: choose one of {', '.join(CORRUPTIONS)}")


# --------------------------------------------------------------------------------------------
# surrogates


def init_surrogate(key: Array, kind: str, dim: int, num_classes: int, hidden: int = 128) -> dict:
    """Parameters of a softmax regression (``linear``) or a one-hidden-layer ReLU MLP (``mlp``)."""
    if kind == "linear":
        return {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}
    if kind == "mlp":
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (dim, hidden)) * jnp.sqrt(2.0 / dim), "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, num_classes)) * jnp.sqrt(1.0 / hidden), "b2": jnp.zeros((num_classes,)),
        }
    raise CfjaxError(f"unknown surrogate {kind!r}: choose one of {', '.join(SURROGATES)}")


def surrogate_logits(params: dict, x: Array) -> Array:
    """x (B, H, W, C) -> logits (B, num_classes) of either surrogate kind."""
    h = x.reshape(x.shape[0], -1)
    if "w" in params:
        return h @ params["w"] + params["b"]
    return jax.nn.relu(h @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@partial(jax.jit, static_argnames=("kind", "num_classes", "steps", "hidden"))
def train_surrogate(key: Array, x: Array, y: Array, kind: str, num_classes: int, steps: int = 500,
                    lr: float = 3e-3, weight_decay: float = 1e-4, hidden: int = 128) -> dict:
    """Full-batch AdamW on cross-entropy with labels y (B,) from the explained model."""
    params = init_surrogate(key, kind, int(np.prod(x.shape[1:])), num_classes, hidden)
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(surrogate_logits(p, x), y))

    def step(_, carry):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return params


def agreement(params: dict, x: Array, y_model: Array) -> Array:
    """Fraction of x (B, H, W, C) on which the surrogate's class equals the model's y_model (B,)."""
    return jnp.mean(jnp.argmax(surrogate_logits(params, x), -1) == y_model)


# --------------------------------------------------------------------------------------------
# the experiment


def _predict(logits_fn: Callable, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    f = jax.jit(lambda z: jnp.argmax(logits_fn(z), -1))
    return map_chunks(lambda xb: f(jnp.asarray(xb)), (x,), batch_size, pad=len(x) > batch_size).astype(np.int32)


def perturbation_sets(logits_fn: Callable, x: np.ndarray, x_cf: np.ndarray, y_target: np.ndarray, seed: int = 0,
                      pgd_steps: int = 10, batch_size: int = 256) -> dict:
    """The perturbed images of each kind, one per query, with the counterfactual's L2 budget.

    x, x_cf (N, H, W, C) in [0, 1]; y_target (N,). Returns {name: (N, H, W, C)} for
    ``counterfactual``, ``random`` and ``adversarial``.
    """
    x, x_cf = np.asarray(x, np.float32), np.asarray(x_cf, np.float32)
    if x.shape != x_cf.shape or x.ndim != 4:
        raise CfjaxError(f"x and x_cf must both be (N, H, W, C), got {x.shape} and {x_cf.shape}")
    budget = np.asarray(_l2(jnp.asarray(x_cf - x)))
    rnd = np.asarray(random_perturbation(jax.random.PRNGKey(seed), jnp.asarray(x), jnp.asarray(budget)))
    pgd = jax.jit(lambda a, t, b: pgd_l2(logits_fn, a, t, b, pgd_steps))
    adv = map_chunks(lambda a, t, b: pgd(jnp.asarray(a), jnp.asarray(t), jnp.asarray(b)), (x, y_target, budget), batch_size, pad=False)
    return {"counterfactual": x_cf, "random": rnd, "adversarial": adv}


def run_experiment(logits_fn: Callable, x: np.ndarray, x_cf: np.ndarray, y_target: np.ndarray, x_test: np.ndarray,
                   surrogates=SURROGATES, corruptions=CORRUPTIONS, seeds: int = 3, steps: int = 500, pgd_steps: int = 10,
                   seed: int = 0) -> dict:
    """Train surrogates on each perturbation set and score them against the model.

    Returns {"rows": [{set, surrogate, corruption, agreement_mean, agreement_std, n_train,
    flip_rate, mean_l2}], "test_n": ...}. ``flip_rate``: fraction of perturbed images whose model
    label differs from the query's (how much boundary information the set carries).
    """
    x = np.asarray(x, np.float32)
    if len(x) == 0:
        raise CfjaxError("the decision-boundary experiment needs at least one query")
    positive_int(seeds, "seeds")
    y_x = _predict(logits_fn, x)
    sets = perturbation_sets(logits_fn, x, x_cf, np.asarray(y_target, np.int32), seed, pgd_steps)
    labelled = {"queries only": (x, y_x, 0.0, 0.0)}
    for name, xp in sets.items():
        yp = _predict(logits_fn, xp)
        labelled[name] = (np.concatenate([x, xp]), np.concatenate([y_x, yp]), float(np.mean(yp != y_x)),
                          float(np.mean(np.asarray(_l2(jnp.asarray(xp - x))))))
    tests = {}
    for i, c in enumerate(corruptions):
        xt = np.asarray(corrupt(jnp.asarray(x_test, jnp.float32), c, jax.random.PRNGKey(1000 + i)))
        tests[c] = (xt, _predict(logits_fn, xt))
    num_classes = int(np.asarray(jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.float32)).shape)[-1])
    rows = []
    for name, (xs, ys, flip, l2) in labelled.items():
        for kind in surrogates:
            params = [train_surrogate(jax.random.PRNGKey(seed + s), jnp.asarray(xs), jnp.asarray(ys), kind, num_classes, steps)
                      for s in range(seeds)]
            for c, (xt, yt) in tests.items():
                a = np.array([float(agreement(p, jnp.asarray(xt), jnp.asarray(yt))) for p in params])
                rows.append({"set": name, "surrogate": kind, "corruption": c, "agreement_mean": float(a.mean()),
                             "agreement_std": float(a.std()), "n_train": int(len(xs)), "flip_rate": flip, "mean_l2": l2})
    return {"rows": rows, "test_n": int(len(x_test))}
