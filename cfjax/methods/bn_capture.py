"""Running any Flax linen classifier while recording its BatchNorm inputs, and scoring them.

:func:`capture` records, for every ``nn.BatchNorm`` call, its input (features last) and running
statistics, plus the features of one layer; :func:`bn_statistics_loss` is DeepInversion's
BatchNorm-statistics term over those inputs. DISC (:mod:`cfjax.methods.disc`) and data-free
DeepInversion (:mod:`cfjax.methods.deep_inversion`) both use these two, under either
convention (statistics per image or over the batch).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError

BN_CONVENTIONS = ("image", "batch")

__all__ = ["BN_CONVENTIONS", "Capture", "capture", "bn_statistics_loss"]


class Capture(NamedTuple):
    """What one classifier call recorded. logits (B, C); per BN layer its input with the feature
    axis last, (B, ..., F), and its running mean / var (F,); features (B, ...) or None."""

    logits: jax.Array
    bn_inputs: tuple
    bn_stats: tuple
    features: jax.Array | None


def _bn_features_last(module: nn.BatchNorm, h: jax.Array) -> jax.Array:
    given = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = tuple(int(a) % h.ndim for a in given)
    if 0 in axes:
        raise CfjaxError("a BatchNorm layer normalises over the batch axis 0: cfjax expects batch-first inputs")
    rest = [a for a in range(h.ndim) if a not in axes]
    h = jnp.transpose(h, rest + list(axes))
    return h.reshape(h.shape[: len(rest)] + (-1,))


def capture(
    apply_fn: Callable,
    variables: Any,
    x: jax.Array,
    apply_kwargs: dict | tuple | None = None,
    feature_layer: str | None = "penultimate",
) -> Capture:
    """Run ``apply_fn(variables, x, **apply_kwargs) -> logits (B, C)`` recording, for every
    ``nn.BatchNorm`` call, its input and running statistics (``batch_stats`` mean / var), and
    the features of ``feature_layer``: ``"penultimate"`` = the input of the last ``nn.Dense``
    called, ``"logits"``, a module name or path ("Conv_1", "encoder/Dense_0": its output), or
    None. Pure (usable under jit/vmap/grad): uses ``flax.linen.intercept_methods``.

    The classifier must run in evaluation mode (BatchNorm with ``use_running_average=True``);
    pass e.g. ``apply_kwargs={"train": False}`` if ``apply_fn`` needs it.
    """
    kwargs = dict(apply_kwargs or {})
    bn_inputs, bn_stats, feats = [], [], {}

    def interceptor(next_fun, args, kw, ctx):
        mod = ctx.module
        if ctx.method_name == "__call__" and isinstance(mod, nn.BatchNorm):
            ura = kw.get("use_running_average", args[1] if len(args) > 1 else None)
            if not nn.merge_param("use_running_average", mod.use_running_average, ura):
                raise CfjaxError(
                    "the classifier runs BatchNorm in training mode; call it in evaluation mode "
                    "(use_running_average=True, e.g. apply_kwargs={'train': False})"
                )
            h = args[0]
            bn_inputs.append(_bn_features_last(mod, h))
            bn_stats.append((mod.get_variable("batch_stats", "mean").reshape(-1), mod.get_variable("batch_stats", "var").reshape(-1)))
        out = next_fun(*args, **kw)
        if ctx.method_name == "__call__" and feature_layer not in (None, "logits"):
            if feature_layer == "penultimate":
                if isinstance(mod, nn.Dense):
                    feats["f"] = args[0]
            elif mod.name == feature_layer or "/".join(str(p) for p in mod.path) == feature_layer:
                feats["f"] = out
        return out

    with nn.intercept_methods(interceptor):
        logits = apply_fn(variables, x, **kwargs)
    if not hasattr(logits, "ndim") or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise CfjaxError(f"apply_fn must return logits of shape (B, C) = ({x.shape[0]}, C), got {getattr(logits, 'shape', type(logits))}")
    if feature_layer == "logits":
        features = logits
    elif feature_layer is None:
        features = None
    else:
        if "f" not in feats:
            what = "no nn.Dense layer" if feature_layer == "penultimate" else f"no module named {feature_layer!r}"
            raise CfjaxError(f"feature layer {feature_layer!r}: the classifier has {what}; choose another feature_layer or set lambda_feat 0")
        features = feats["f"]
    return Capture(logits, tuple(bn_inputs), tuple(bn_stats), features)


def _safe_norm(v: jax.Array, axis=-1) -> jax.Array:
    # ||v||_2 with a finite gradient at v = 0.
    return jnp.sqrt(jnp.sum(v * v, axis) + 1e-20)


def bn_statistics_loss(
    bn_inputs: Sequence[jax.Array],
    running_stats: Sequence[tuple[jax.Array, jax.Array]],
    convention: str = "image",
    first_bn_weight: float = 10.0,
) -> jax.Array:
    """DeepInversion's BatchNorm-statistics term.

    bn_inputs: per BN layer its INPUT, features last: (B, H, W, F) or (B, F) (see
    :func:`capture`); running_stats: per layer (running mean (F,), running var (F,)).
    Per layer: ||mu - mu_run||_2 + ||var - var_run||_2 with mu / var the mean / biased variance
    over (B, H, W) (``"batch"``, returns a scalar) or over (H, W) of each image (``"image"``,
    returns (B,); layers without spatial axes are skipped). The first BN layer is weighted by
    ``first_bn_weight`` (10 in the DeepInversion reference code).
    """
    if convention not in BN_CONVENTIONS:
        raise CfjaxError(f"unknown BatchNorm convention {convention!r}: choose one of {', '.join(BN_CONVENTIONS)}")
    total: jax.Array | float = 0.0
    for i, (h, (m_run, v_run)) in enumerate(zip(bn_inputs, running_stats)):
        w = first_bn_weight if i == 0 else 1.0
        if convention == "batch":
            axes = tuple(range(h.ndim - 1))
        else:
            if h.ndim <= 2:
                continue
            axes = tuple(range(1, h.ndim - 1))
        mu = jnp.mean(h, axes, keepdims=True)
        var = jnp.mean((h - mu) ** 2, axes)
        mu = jnp.squeeze(mu, axes)
        total = total + w * (_safe_norm(mu - m_run) + _safe_norm(var - v_run))
    if isinstance(total, float):  # no layer contributed
        return jnp.zeros(bn_inputs[0].shape[:1]) if convention == "image" and bn_inputs else jnp.zeros(())
    return total
