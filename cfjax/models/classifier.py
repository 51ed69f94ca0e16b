"""Image classifiers with BatchNorm (the models DISC explains) and a BN-free MLP (an oracle).

Public API (everything is a pure function of an explicit ``variables`` pytree)::

    ClassifierConfig(arch="cnn"|"resnet"|"mlp", num_classes=10, image_shape=(28, 28, 1),
                     width=32, hidden=128, depth=2, bn_momentum=0.9)     # frozen; to_dict/from_dict
    make_classifier(config) -> flax.linen.Module        # module(x, train=False) -> logits (B, C)
    init_classifier(key, config) -> variables           # {'params': ..., 'batch_stats': ...}
                                                        #  (no 'batch_stats' key for "mlp")
    classifier_apply(config) -> apply_fn                # apply_fn(variables, x, train=False) -> logits (B, C)
    classifier_train_apply(config) -> train_apply_fn    # train_apply_fn(variables, x) -> (logits, new_batch_stats)
    predict_proba(apply_fn, variables, x) -> (B, C)     # softmax of apply_fn(variables, x)
    has_batchnorm(variables) -> bool

``x`` is ``(B, H, W, C)`` float32 in [0, 1]. ``apply_fn(variables, x)`` (eval mode) normalises
with the BatchNorm running statistics and is jittable, vmappable and differentiable in ``x`` and
``variables``. ``train=True`` normalises with the statistics of the batch itself (running
statistics are not updated; use ``classifier_train_apply`` in training to get them).

Architectures (``width`` = w):

- ``"cnn"``: conv3x3(w)-BN-ReLU-conv3x3(w)-BN-ReLU-maxpool2 - conv3x3(2w)-BN-ReLU-conv3x3(2w)-BN-ReLU-
  maxpool2 - dense(hidden)-BN-ReLU - dense(C). BatchNorm layers are named ``bn1`` ... ``bn5``.
- ``"resnet"``: conv3x3(w)-BN-ReLU stem, three stages of ``depth`` pre-activation-free basic
  blocks (conv-BN-ReLU-conv-BN + shortcut, ReLU) with widths w, 2w, 4w (stride 2 at the start of
  stages 2 and 3; 1x1 conv-BN projection shortcut when the shape changes), global average pool,
  dense(C).
- ``"mlp"``: flatten - ``depth`` x [dense(hidden)-ReLU] - dense(C). No BatchNorm: an independent
  oracle architecture and a model on which a BN-statistics prior is meaningless.

BatchNorm is the standard ``nn.BatchNorm(use_running_average=not train)`` over the last axis,
with its running ``mean``/``var`` in the ``batch_stats`` collection (Flax momentum
``bn_momentum``: new = momentum * old + (1 - momentum) * batch).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfjax.errors import CfjaxError

ARCHS = ("cnn", "resnet", "mlp")


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "cnn"
    num_classes: int = 10
    image_shape: tuple[int, ...] = (28, 28, 1)
    width: int = 32          # channels of the first conv (cnn, resnet)
    hidden: int = 128        # dense width (cnn head, mlp layers)
    depth: int = 2           # blocks per stage (resnet) / hidden layers (mlp)
    bn_momentum: float = 0.9

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise CfjaxError(f"unknown classifier architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise CfjaxError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape}")
        for name in ("num_classes", "width", "hidden", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "num_classes" else 1):
                raise CfjaxError(f"classifier {name} must be a positive integer{' >= 2' if name == 'num_classes' else ''}, got {v!r}")
        if not 0.0 <= float(self.bn_momentum) < 1.0:
            raise CfjaxError(f"bn_momentum must lie in [0, 1), got {self.bn_momentum}")

    @property
    def uses_batchnorm(self) -> bool:
        return self.arch != "mlp"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        if not isinstance(d, dict):
            raise CfjaxError(f"not a classifier config (expected a dict, got {type(d).__name__})")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise CfjaxError(f"not a classifier config (unknown fields {sorted(unknown)})")
        if "arch" not in d:
            raise CfjaxError("not a classifier config (no 'arch')")
        try:
            return cls(**{**d, "image_shape": tuple(d.get("image_shape", (28, 28, 1)))})
        except TypeError as e:
            raise CfjaxError(f"not a classifier config ({e})") from e


def _bn(config: ClassifierConfig, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=config.bn_momentum, name=name)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, VALID (odd trailing rows/columns dropped): (B, H, W, F) ->
    (B, H // 2, W // 2, F), the same values and gradients as ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

    Written as a choice among the four strided slices of each window: the gradient goes to the
    first maximal element in row-major window order, as XLA's select-and-scatter (flax) and
    torch's max_pool2d route it (ties are common: a constant background gives four equal values).
    XLA:CPU runs this form's gradient far faster and with far less temporary memory than the
    select-and-scatter one (DISC at batch 256: 0.71x -> 1.07x the torch twin, 1334 -> 462 MB;
    benchmarks/results/disc_cpu.json notes).
    """
    h, w = x.shape[1] - x.shape[1] % 2, x.shape[2] - x.shape[2] % 2
    a, b = x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2]
    c, d = x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2]
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    return jnp.where(a >= m, a, jnp.where(b >= m, b, jnp.where(c >= m, c, d)))


class _CNN(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        w = c.width
        for i, feats in enumerate((w, w, 2 * w, 2 * w), start=1):
            x = nn.Conv(feats, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.relu(_bn(c, train, f"bn{i}")(x))
            if i % 2 == 0:
                x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(c.hidden, use_bias=False, name="fc1")(x)
        x = nn.relu(_bn(c, train, "bn5")(x))
        return nn.Dense(c.num_classes, name="head")(x)


class _Block(nn.Module):
    config: ClassifierConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        s = (self.stride, self.stride)
        y = nn.Conv(self.features, (3, 3), strides=s, use_bias=False, name="conv1")(x)
        y = nn.relu(_bn(c, train, "bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = _bn(c, train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=s, use_bias=False, name="proj")(x)
            x = _bn(c, train, "proj_bn")(x)
        return nn.relu(x + y)


class _ResNet(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        x = nn.Conv(c.width, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(_bn(c, train, "stem_bn")(x))
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(c.depth):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = _Block(c, c.width * mult, stride, name=f"stage{stage + 1}_block{b + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(c.num_classes, name="head")(x)


class _MLP(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x, train: bool = False):  # noqa: ARG002 - same signature as the others
        c = self.config
        x = x.reshape(x.shape[0], -1)
        for i in range(c.depth):
            x = nn.relu(nn.Dense(c.hidden, name=f"fc{i + 1}")(x))
        return nn.Dense(c.num_classes, name="head")(x)


def make_classifier(config: ClassifierConfig) -> nn.Module:
    """The Flax module for ``config``: ``module.apply(variables, x, train)`` -> logits (B, C)."""
    if not isinstance(config, ClassifierConfig):
        raise CfjaxError(f"expected a ClassifierConfig, got {type(config).__name__}")
    return {"cnn": _CNN, "resnet": _ResNet, "mlp": _MLP}[config.arch](config)


def init_classifier(key: jax.Array, config: ClassifierConfig) -> dict:
    """Fresh variables: ``{'params', 'batch_stats'}`` (``{'params'}`` only for "mlp")."""
    x = jnp.zeros((1, *config.image_shape), jnp.float32)
    variables = make_classifier(config).init(key, x, train=False)
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


@functools.lru_cache(maxsize=32)
def classifier_apply(config: ClassifierConfig) -> Callable:
    """``apply_fn(variables, x (B, H, W, C), train=False) -> logits (B, C)``.

    One function per config (cached): code that takes ``apply_fn`` as a static jit argument
    (cfjax.methods.disc) then reuses its compilations when the same model is loaded again.

    Eval mode uses the running statistics. ``train=True`` normalises with the batch's own
    statistics and discards their running-average update.
    """
    module = make_classifier(config)

    def apply_fn(variables, x, train: bool = False):
        if train and "batch_stats" in variables:
            logits, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits
        return module.apply(variables, x, train=train)

    return apply_fn


def classifier_train_apply(config: ClassifierConfig) -> Callable:
    """``train_apply_fn(variables, x) -> (logits (B, C), new_batch_stats)`` for training.

    BatchNorm normalises with the batch statistics; ``new_batch_stats`` holds the updated
    running averages (an empty dict for "mlp").
    """
    module = make_classifier(config)

    def train_apply_fn(variables, x):
        if "batch_stats" not in variables:
            return module.apply(variables, x, train=True), {}
        logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return train_apply_fn


def predict_proba(apply_fn: Callable, variables, x) -> jax.Array:
    """Class probabilities (B, C): softmax of ``apply_fn(variables, x)`` (eval mode)."""
    return jax.nn.softmax(apply_fn(variables, x), axis=-1)


def has_batchnorm(variables) -> bool:
    """True when ``variables`` carries BatchNorm running statistics."""
    return bool(jax.tree_util.tree_leaves(variables.get("batch_stats", {})))
