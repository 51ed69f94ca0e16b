"""Train the Glow generative classifier (IB-INN loss) that ECINN explains.

    cfjax train flow --data mnist5k --out DIR [--epochs N --batch-size B --seed S --resume]

After training, the mean latent of the training images the model predicts as each class is
computed once and saved with the weights (ECINN's translation directions). ``--export DIR2``
also writes an inference-only copy (parameters, no optimizer state) for shipping.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfjax import checkpoint as ckpt
from cfjax import model_dirs
from cfjax.data import Dataset, load_dataset
from cfjax.augment import check_affine, random_affine
from cfjax.errors import CfjaxError
from cfjax.methods.ecinn import class_mean_sums
from cfjax.models import flow_classifier as fc
from cfjax.models import latent as latent_lib
from cfjax.models.glow import GlowConfig
from cfjax.models.ibinn import IBINNConfig
from cfjax.models.latent import LatentConfig
from cfjax.pipelines.training import CHECKPOINT_EVERY, TrainSpec, check_out_dir, fit, random_shift
from cfjax.validation import non_negative_float, non_negative_int, positive_float, positive_int

KIND = "flow"


OPTIMIZERS = ("adam", "sgd")


def _labels(params, split_latent: bool = False):
    """Optimizer groups: the flow's weights, the latent (means and prior: one group "latent", or
    "mu" and "prior" when ``split_latent``), and frozen leaves (the class-mean cache and, for the
    IB-INN network, its BatchNorm running statistics)."""
    glow = jax.tree_util.tree_map(lambda _: "flow", params["glow"])
    if isinstance(params["glow"], dict) and "bn" in params["glow"]:
        glow = dict(glow, bn=jax.tree_util.tree_map(lambda _: "frozen", params["glow"]["bn"]))
    return {
        "glow": glow,
        "latent": {"mu": "mu", "logit_prior": "prior"} if split_latent else jax.tree_util.tree_map(lambda _: "latent", params["latent"]),
        "class_means": "frozen",
    }


def make_optimizer(lr: float, total_steps: int, mean_lr_factor: float = 10.0, clip: float = 10.0, optimizer: str = "adam"):
    """The flow trainer's optimizer.

    ``"adam"``: Adam (weight decay 1e-5) with warm-up + cosine decay; the class means and the
    prior learn ``mean_lr_factor`` x faster.
    ``"sgd"`` (the IB-INN recipe): SGD with momentum 0.9 and weight decay 1e-4, a linear burn-in
    over min(500, steps/10) steps, lr x 0.1 for the last sixth of the steps; the class means at
    ``mean_lr_factor`` x lr without momentum or weight decay, the prior with momentum 0.8.
    Both clip the global gradient norm at ``clip``.
    """
    if optimizer not in OPTIMIZERS:
        raise CfjaxError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adam":
        warmup = max(1, min(200, total_steps // 10))
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * 0.02)
        sched_mu = lambda s: mean_lr_factor * sched(s)  # noqa: E731
        groups = {"flow": optax.adamw(sched, weight_decay=1e-5), "latent": optax.adam(sched_mu)}
    else:
        burn_in = max(1, min(500, total_steps // 10))
        decay_at = max(burn_in + 1, (5 * total_steps) // 6)
        sched = optax.join_schedules(
            [optax.linear_schedule(lr / burn_in, lr, burn_in), optax.constant_schedule(lr), optax.constant_schedule(0.1 * lr)],
            [burn_in, decay_at],
        )
        sched_mu = lambda s: mean_lr_factor * sched(s)  # noqa: E731
        groups = {
            "flow": optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(sched, momentum=0.9)),
            "mu": optax.sgd(sched_mu),
            "prior": optax.sgd(sched, momentum=0.8),
        }
    groups["frozen"] = optax.set_to_zero()
    labels = partial(_labels, split_latent=optimizer == "sgd")
    return optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform(groups, labels))


# Per-architecture defaults of the training options that are left unset on the command line.
# "ibinn" is the IB-INN / ECINN authors' MNIST recipe; "ibinn-small" the same with fewer blocks.
RECIPES: dict[str, dict[str, Any]] = {
    "glow": {"epochs": 40, "batch_size": 64, "lr": 1e-3, "beta": 8.0, "optimizer": "adam",
             "label_smoothing": 0.05, "train_prior": False, "mean_lr_factor": 10.0, "clip": 10.0},
    "ibinn": {"epochs": 60, "batch_size": 128, "lr": 0.07, "beta": 1.4265, "optimizer": "sgd",
              "label_smoothing": 0.01, "train_prior": True, "mean_lr_factor": 3.0, "clip": 8.0},
}
RECIPES["ibinn-small"] = dict(RECIPES["ibinn"])
ARCHS = tuple(RECIPES)
IBINN_SMALL_BLOCKS = 8  # blocks per resolution of --arch ibinn-small (the full network has 24)


@dataclass(frozen=True)
class FlowArchitecture:
    """The flow ``cfjax train flow`` builds: a named preset over the model configs.

    ``arch``: "glow" (GlowConfig with ``levels``, ``steps_per_level``, ``hidden`` channels at
    level 0 doubling per level, ``downsample``, ``split_levels``) or "ibinn" / "ibinn-small"
    (IBINNConfig with ``blocks`` per resolution, None: 24 / 8, ``dense``, ``batchnorm``,
    ``mixing``). ``hidden`` defaults to 32, the shipped Glow flow's width (GlowConfig's own
    default is 64); every other default is the model config's.
    """

    arch: str = "glow"
    levels: int = GlowConfig.num_levels
    steps_per_level: int = GlowConfig.steps_per_level
    hidden: int = 32
    downsample: str = GlowConfig.downsample
    split_levels: bool = GlowConfig.split
    blocks: int | None = None
    dense: bool = IBINNConfig.dense
    batchnorm: bool = IBINNConfig.batchnorm
    mixing: str = IBINNConfig.mixing
    noise_sigma: float = fc.FlowClassifierConfig.noise_sigma
    preprocess: str = fc.FlowClassifierConfig.preprocess
    noise_boundary: str | None = None  # None: the architecture's ("none" for ibinn, as the authors; "reflect" for glow)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise CfjaxError(f"unknown flow architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        non_negative_float(self.noise_sigma, "noise_sigma")


@dataclass(frozen=True)
class FlowTraining:
    """How ``cfjax train flow`` optimises: None fields take the architecture's :data:`RECIPES`
    entry (:meth:`resolved`). ``steps`` (total optimizer steps) overrides ``epochs``."""

    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    beta: float | None = None
    label_smoothing: float | None = None
    train_prior: bool | None = None
    mean_lr_factor: float | None = None
    clip: float | None = None
    augment_shift: int = 0
    augment_rotate: float = 0.0
    augment_scale: float = 0.0
    ema: float = 0.0
    seed: int = 0
    checkpoint_every: int = CHECKPOINT_EVERY

    def resolved(self, arch: str) -> "FlowTraining":
        """This recipe with every unset field filled from ``RECIPES[arch]``, checked."""
        filled = dataclasses.replace(self, **{k: v for k, v in RECIPES[arch].items() if getattr(self, k) is None})
        for name in ("epochs", "steps", "batch_size", "checkpoint_every"):
            if getattr(filled, name) is not None:
                positive_int(getattr(filled, name), name)
        positive_float(filled.lr, "lr")
        positive_float(filled.beta, "beta")
        non_negative_float(filled.label_smoothing, "label_smoothing")
        non_negative_int(filled.augment_shift, "augment_shift")
        check_affine(filled.augment_rotate, filled.augment_scale)
        check_ema(filled.ema)
        return filled


def flow_config(arch: FlowArchitecture, training: FlowTraining, image_shape, num_classes: int) -> fc.FlowClassifierConfig:
    """The FlowClassifierConfig of ``arch`` trained with the resolved recipe ``training``."""
    latent = LatentConfig(num_classes=num_classes, beta=training.beta, label_smoothing=training.label_smoothing,
                          train_prior=bool(training.train_prior))
    if arch.arch == "glow":
        flow: GlowConfig | IBINNConfig = GlowConfig(
            image_shape=tuple(image_shape),
            num_levels=arch.levels,
            steps_per_level=arch.steps_per_level,
            hidden_channels=arch.hidden,
            max_hidden_channels=max(arch.hidden, 2 * arch.hidden),
            downsample=arch.downsample,
            split=arch.split_levels,
        )
    else:
        n = arch.blocks if arch.blocks is not None else (IBINNConfig.blocks_high if arch.arch == "ibinn" else IBINN_SMALL_BLOCKS)
        flow = IBINNConfig(image_shape=tuple(image_shape), blocks_high=n, blocks_low=n, dense=arch.dense,
                           batchnorm=arch.batchnorm, mixing=arch.mixing)
    boundary = arch.noise_boundary or ("none" if arch.arch != "glow" and arch.preprocess == "affine" else "reflect")
    return fc.FlowClassifierConfig(glow=flow, latent=latent, noise_sigma=arch.noise_sigma, preprocess=arch.preprocess,
                                   noise_boundary=boundary)


def _init_batch(images: np.ndarray, n: int = 256, seed: int = 0) -> np.ndarray:
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[idx]


@partial(jax.jit, static_argnums=1)
def _encode_predict(params, config, x):
    z, logdet = fc.encode(params, config, x)
    logits = latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test)
    return z, logdet, logits


def predicted_class_means(params: dict, config: fc.FlowClassifierConfig, images: np.ndarray, batch_size: int = 500) -> jax.Array:
    """m_c: mean latent of the images predicted as class c, (C, D). Classes never predicted keep mu_c."""
    c = config.num_classes
    sums = jnp.zeros((c, config.latent_dim))
    counts = jnp.zeros((c,))
    for i in range(0, len(images), batch_size):
        z, _, logits = _encode_predict(params, config, jnp.asarray(images[i : i + batch_size]))
        s, n = class_mean_sums(z, jnp.argmax(logits, -1), c)
        sums, counts = sums + s, counts + n
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.where((counts > 0)[:, None], means, params["latent"]["mu"])


def evaluate_flow(params: dict, config: fc.FlowClassifierConfig, data: Dataset, batch_size: int = 500) -> dict:
    """Test accuracy and bits/dim (uniform dequantisation, fixed key)."""
    correct, bpd = 0, []
    key = jax.random.PRNGKey(1234)
    for i in range(0, len(data), batch_size):
        x = jnp.asarray(data.images[i : i + batch_size])
        xd = x + jax.random.uniform(jax.random.fold_in(key, i), x.shape, maxval=1.0 / config.dequantize_bins)
        z, logdet, logits = _encode_predict(params, config, xd)
        correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(data.labels[i : i + batch_size])))
        nll = -latent_lib.log_p_x(params["latent"], z, logdet) / config.latent_dim
        bpd.append(np.asarray(latent_lib.bits_per_dim(nll, config.dequantize_bins)))
    return {"test_accuracy": correct / len(data), "test_bits_per_dim": float(np.mean(np.concatenate(bpd)))}


def check_ema(decay: float) -> float:
    """``decay`` of the weight average: 0 (off) or in (0, 1); CfjaxError otherwise."""
    if not (decay == 0.0 or 0.0 < decay < 1.0):
        raise CfjaxError(f"ema must be 0 (off) or a decay in (0, 1), got {decay!r}")
    return float(decay)


def ema_update(average, params, count, decay: float):
    """One step of the exponential moving average of the weights (Polyak averaging, as Glow's
    own training code evaluates with): ``average <- d * average + (1 - d) * params`` with
    ``d = min(decay, (1 + count) / (10 + count))``, so the first steps, whose weights are far
    from the final ones, are forgotten quickly instead of lingering with weight decay**count.
    ``count``: steps averaged before this one. Returns the new average (same tree as params)."""
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    return jax.tree_util.tree_map(lambda a, p: d * a + (1.0 - d) * p, average, params)


def build_spec(config: fc.FlowClassifierConfig, train: Dataset, lr: float, total_steps: int, seed: int, augment_shift: int = 0,
               optimizer: str = "adam", mean_lr_factor: float = 10.0, clip: float = 10.0, init_params: dict | None = None,
               info: dict | None = None, ema: float = 0.0, augment_rotate: float = 0.0, augment_scale: float = 0.0) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit`: IB-INN loss, the chosen optimizer
    (see :func:`make_optimizer`), optional random shifts of up to ``augment_shift`` pixels (zero
    fill) and random rotations / scalings of up to ``augment_rotate`` degrees / ``augment_scale``
    (:func:`cfjax.augment.random_affine`) before dequantisation. ``init_params`` (a trained flow's params, see
    :func:`warm_start_params`) replaces the random initialisation; the optimizer starts fresh.
    ``info``: extra fields for the model directory's record. ``ema`` > 0 keeps an exponential
    moving average of the weights (:func:`ema_update`) in the state, and the trained model is
    that average (its BatchNorm statistics and class means computed for it); the last step's
    weights stay in the final checkpoint as ``online_params``."""
    non_negative_int(augment_shift, "augment_shift")
    check_affine(augment_rotate, augment_scale)
    ema = check_ema(ema)
    opt = make_optimizer(lr, total_steps, mean_lr_factor=mean_lr_factor, clip=clip, optimizer=optimizer)

    def init_state():
        if init_params is not None:
            params = jax.tree_util.tree_map(jnp.asarray, init_params)
        else:
            params = fc.init_flow_classifier(jax.random.PRNGKey(seed), config, jnp.asarray(_init_batch(train.images, seed=seed)))
        state = {"params": params, "opt_state": opt.init(params)}
        if ema:
            state["ema"] = {"params": params, "count": jnp.zeros((), jnp.float32)}
        return state

    @jax.jit
    def train_step(state, x, y, key):
        if augment_shift:
            key, k_shift = jax.random.split(key)
            x = random_shift(k_shift, jnp.asarray(x, jnp.float32), augment_shift)
        if augment_rotate or augment_scale:
            key, k_affine = jax.random.split(key)
            x = random_affine(k_affine, jnp.asarray(x, jnp.float32), augment_rotate, augment_scale)
        (loss, aux), grads = jax.value_and_grad(fc.loss_fn, has_aux=True)(state["params"], config, x, y, key)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if fc.is_ibinn(config):  # the training-mode pass's BatchNorm running statistics
            params = dict(params, glow=dict(params["glow"], bn=aux["flow"]["bn"]))
        new = {"params": params, "opt_state": opt_state}
        if ema:
            count = state["ema"]["count"]
            new["ema"] = {"params": ema_update(state["ema"]["params"], params, count, ema), "count": count + 1.0}
        return new, {"loss": loss, "bpd": aux["bpd"], "acc": aux["acc"]}

    def finalize(state, train_data):
        params = dict(state["params"])
        if ema:
            state = {**state, "online_params": state["params"]}
            params = dict(state["ema"]["params"])
        if fc.is_ibinn(config):
            batch = _init_batch(train_data.images, n=min(1024, len(train_data)), seed=seed + 1)
            params = fc.refresh_batch_stats(params, config, batch, jax.random.PRNGKey(seed + 1))
        params["class_means"] = predicted_class_means(params, config, train_data.images)
        return {**state, "params": params}

    return TrainSpec(
        kind=KIND,
        config=config.to_dict(),
        init_state=init_state,
        train_step=train_step,
        evaluate=lambda state, data: evaluate_flow(state["params"], config, data),
        finalize=finalize,
        info={"lr": lr, "augment_shift": augment_shift, "augment_rotate": float(augment_rotate), "augment_scale": float(augment_scale), "ema": ema, "optimizer": optimizer, "mean_lr_factor": mean_lr_factor, "clip": clip,
              **(info or {})},
        show=("loss", "bpd", "acc"),
    )


def warm_start_params(model_dir, config: fc.FlowClassifierConfig) -> tuple[dict, dict]:
    """``(params, record)``: the parameters of the trained flow in ``model_dir`` as the starting
    point of a new run of ``config`` (``cfjax train flow --init-from``), and what the new model
    directory records about it. The network (``config.glow``, preprocessing) and the class count
    must be the same; the training recipe, beta and label smoothing may differ. The cached
    predicted class means stay frozen until the new run's ``finalize`` recomputes them.
    CfjaxError naming the differing fields otherwise."""
    m = model_dirs.load(KIND, model_dir)
    mine, theirs = config.to_dict(), m.config.to_dict()
    for key in ("glow", "preprocess", "dequantize_bins"):
        if mine.get(key) != theirs.get(key):
            a, b = mine.get(key), theirs.get(key)
            diff = [k for k in (a or {}) if (b or {}).get(k) != a[k]] if isinstance(a, dict) else [key]
            raise CfjaxError(f"init_from: {model_dir} is a different network ({key}: {', '.join(map(str, diff)) or key} "
                             f"differ); pass the same --arch and network options it was trained with")
    if m.config.num_classes != config.num_classes:
        raise CfjaxError(f"init_from: {model_dir} has {m.config.num_classes} classes, the data {config.num_classes}")
    params = dict(m.params)
    steps = (m.info.get("train_settings") or {}).get("steps")
    return params, {"init_from": str(model_dir), "init_from_steps": steps}


def load_flow(model_dir: str | Path) -> tuple[dict, fc.FlowClassifierConfig, dict]:
    """``(params, config, info)`` of a flow model directory: :func:`cfjax.model_dirs.load` in
    the tuple shape callers of this name expect."""
    m = model_dirs.load(KIND, model_dir)
    return m.params, m.config, m.info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained model's parameters (no optimizer state) into a new model directory."""
    return model_dirs.export(src, dst, KIND)


def train(arch: FlowArchitecture, training: FlowTraining, *, out, data: str = "mnist5k", data_dir=None,
          extra_train=(), resume: bool = False, export=None, quiet: bool = False, init_from=None) -> dict:
    """Train (or with ``resume`` continue) the flow of ``arch`` on ``data`` (plus the labelled
    .npz files ``extra_train``) into the model directory ``out``; ``export`` also writes an
    inference-only copy; ``init_from`` starts from a trained flow's weights instead of a random
    initialisation (a new schedule of its own length: how a finished run is extended). Every
    option and the output locations are checked before any data loads. Returns the final
    metrics."""
    from cfjax.data import concat_datasets, load_npz_dataset

    if export:  # before training, not after it
        ckpt.check_export_target(export)
    check_out_dir(Path(out), resume)
    if init_from:  # exists and is a flow, before any data loads (the network is compared below)
        model_dirs.read_config(Path(init_from), KIND)
    training = training.resolved(arch.arch)
    extra = [load_npz_dataset(f) for f in extra_train]  # checked before the (slower) dataset load
    train_ds = load_dataset(data, "train", data_dir)
    test = load_dataset(data, "test", data_dir)
    if extra:
        train_ds = concat_datasets(train_ds, [load_npz_dataset(f, train_ds.num_classes) for f in extra_train])
    config = flow_config(arch, training, train_ds.image_shape, train_ds.num_classes)
    init_params, init_info = warm_start_params(init_from, config) if init_from else (None, {})
    steps_per_epoch = len(train_ds) // max(training.batch_size, 1)
    steps = training.steps if training.steps is not None else training.epochs * steps_per_epoch
    epochs = training.epochs if training.steps is None else -(-steps // max(steps_per_epoch, 1))
    spec = build_spec(config, train_ds, training.lr, steps, training.seed, augment_shift=training.augment_shift,
                      optimizer=training.optimizer, mean_lr_factor=training.mean_lr_factor, clip=training.clip,
                      init_params=init_params, info=init_info, ema=training.ema,
                      augment_rotate=training.augment_rotate, augment_scale=training.augment_scale)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train_ds, test, out, epochs=epochs, batch_size=training.batch_size, seed=training.seed,
        resume=resume, checkpoint_every=training.checkpoint_every, quiet=quiet,
        total_steps=steps if training.steps is not None else None,
    )
    print(
        f"flow trained in {time.perf_counter() - t0:.0f}s: test accuracy {metrics['test_accuracy']:.4f}, "
        f"test bits/dim {metrics['test_bits_per_dim']:.3f} -> {out}"
    )
    if export:
        print(f"exported inference-only model -> {export_inference_model(out, export)}")
    return metrics
