"""Train the Glow generative classifier (IB-INN loss) that ECINN explains.

    cfjax train flow --data mnist5k --out DIR [--epochs N --batch-size B --seed S --resume]

After training, the mean latent of the training images the model predicts as each class is
computed once and saved with the weights (ECINN's translation directions). ``--export DIR2``
also writes an inference-only copy (parameters, no optimizer state) for shipping.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfjax import checkpoint as ckpt
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError
from cfjax.methods.ecinn import class_mean_sums
from cfjax.models import flow_classifier as fc
from cfjax.models import latent as latent_lib
from cfjax.models.glow import GlowConfig
from cfjax.models.ibinn import IBINNConfig
from cfjax.models.latent import LatentConfig
from cfjax.pipelines.training import TrainSpec, fit, random_shift

XLA_WORKLOAD = "train_flow"  # XLA:CPU flags the cli applies for this command (cfjax.xla_cpu)

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
RECIPES = {
    "glow": {"epochs": 40, "batch_size": 64, "lr": 1e-3, "beta": 8.0, "optimizer": "adam",
             "label_smoothing": 0.05, "train_prior": False, "mean_lr_factor": 10.0, "clip": 10.0},
    "ibinn": {"epochs": 60, "batch_size": 128, "lr": 0.07, "beta": 1.4265, "optimizer": "sgd",
              "label_smoothing": 0.01, "train_prior": True, "mean_lr_factor": 3.0, "clip": 8.0},
}
RECIPES["ibinn-small"] = dict(RECIPES["ibinn"])
ARCHS = tuple(RECIPES)
IBINN_SMALL_BLOCKS = 8  # blocks per resolution of --arch ibinn-small (the full network has 24)


def apply_recipe(args) -> None:
    """Fill each training option the user left unset (None) from the architecture's recipe."""
    recipe = RECIPES[args.arch]
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def flow_config_from_args(args, image_shape, num_classes) -> fc.FlowClassifierConfig:
    apply_recipe(args)
    latent = LatentConfig(num_classes=num_classes, beta=args.beta, label_smoothing=args.label_smoothing,
                          train_prior=bool(args.train_prior))
    if args.arch == "glow":
        flow = GlowConfig(
            image_shape=tuple(image_shape),
            num_levels=args.levels,
            steps_per_level=args.steps_per_level,
            hidden_channels=args.hidden,
            max_hidden_channels=max(args.hidden, 2 * args.hidden),
            downsample=args.downsample,
            split=args.split_levels,
        )
    else:
        n = args.blocks if args.blocks is not None else (24 if args.arch == "ibinn" else IBINN_SMALL_BLOCKS)
        flow = IBINNConfig(image_shape=tuple(image_shape), blocks_high=n, blocks_low=n, dense=not args.no_dense,
                           batchnorm=not args.no_batchnorm, mixing=args.mixing)
    return fc.FlowClassifierConfig(glow=flow, latent=latent, noise_sigma=args.noise_sigma, preprocess=args.preprocess)


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


def build_spec(config: fc.FlowClassifierConfig, train: Dataset, lr: float, total_steps: int, seed: int, augment_shift: int = 0,
               optimizer: str = "adam", mean_lr_factor: float = 10.0, clip: float = 10.0) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit`: IB-INN loss, the chosen optimizer
    (see :func:`make_optimizer`), optional random shifts of up to ``augment_shift`` pixels (zero
    fill) before dequantisation."""
    if augment_shift < 0:
        raise CfjaxError(f"--augment-shift must be >= 0, got {augment_shift}")
    opt = make_optimizer(lr, total_steps, mean_lr_factor=mean_lr_factor, clip=clip, optimizer=optimizer)

    def init_state():
        params = fc.init_flow_classifier(jax.random.PRNGKey(seed), config, jnp.asarray(_init_batch(train.images, seed=seed)))
        return {"params": params, "opt_state": opt.init(params)}

    @jax.jit
    def train_step(state, x, y, key):
        if augment_shift:
            key, k_shift = jax.random.split(key)
            x = random_shift(k_shift, jnp.asarray(x, jnp.float32), augment_shift)
        (loss, aux), grads = jax.value_and_grad(fc.loss_fn, has_aux=True)(state["params"], config, x, y, key)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        if fc.is_ibinn(config):  # the training-mode pass's BatchNorm running statistics
            params = dict(params, glow=dict(params["glow"], bn=aux["flow"]["bn"]))
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "bpd": aux["bpd"], "acc": aux["acc"]}

    def finalize(state, train_data):
        params = dict(state["params"])
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
        info={"lr": lr, "augment_shift": augment_shift, "optimizer": optimizer, "mean_lr_factor": mean_lr_factor, "clip": clip},
        show=("loss", "bpd", "acc"),
    )


def abstract_params(config: fc.FlowClassifierConfig):
    """Shapes and dtypes of the parameters (the Glow init draws with NumPy, so it runs concretely)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, *config.image_shape))
    params = fc.init_flow_classifier(jax.random.PRNGKey(0), config, x)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)


def load_flow(model_dir: str | Path) -> tuple[dict, fc.FlowClassifierConfig, dict]:
    """Load a trained flow classifier: (params, config, info). CheckpointError on any problem."""
    info = ckpt.read_model_info(model_dir, expected_kind=KIND)
    try:
        config = fc.FlowClassifierConfig.from_dict(info["config"])
    except CfjaxError as e:
        raise ckpt.CheckpointError(f"{model_dir}: {e}") from e
    params_t = abstract_params(config)
    if info.get("inference_only"):
        target = {"params": params_t}
    else:
        lr = float(info.get("lr", 1e-3))
        opt = make_optimizer(lr, 10, optimizer=info.get("optimizer", "adam"))
        opt_t = jax.eval_shape(opt.init, params_t)
        target = {"params": params_t, "opt_state": opt_t}
    state, _, _ = ckpt.load_checkpoint(model_dir, target)
    if info.get("status") != "complete":
        raise ckpt.CheckpointError(f"{model_dir} holds an unfinished training run (status {info.get('status')!r}); finish it with --resume")
    return state["params"], config, info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained model's parameters (no optimizer state) into a new model directory."""
    params, config, info = load_flow(src)
    return ckpt.export_inference_model(src, dst, KIND, config.to_dict(), {"params": params}, info)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.explain_common import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--out", required=True, help="model directory to write (refuses to overwrite; see --resume)")
    p.add_argument("--extra-train", action="append", default=[], metavar="FILE.npz",
                   help="add the images of an .npz (x, y) to the training split (repeatable); the test split stays --data's")
    p.add_argument("--arch", choices=ARCHS, default="glow",
                   help="flow architecture: glow (the shipped multi-scale Glow), ibinn (the IB-INN authors' network: "
                        "24+24 all-in-one blocks, DCT pooling, dense coupling), ibinn-small (8+8 blocks). Unset training "
                        "options take the architecture's recipe (see README)")
    g = p.add_argument_group("training (unset: the --arch recipe; glow: 40 epochs, batch 64, Adam 1e-3, beta 8; "
                             "ibinn: 60 epochs, batch 128, SGD 0.07, beta 1.4265)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the training set")
    g.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs; sizes a run to the time available)")
    g.add_argument("--batch-size", type=int, default=None, help="images per step")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adam (warm-up + cosine) or sgd (the IB-INN recipe)")
    g.add_argument("--beta", type=float, default=None, help="IB trade-off: larger favours accuracy over likelihood")
    g.add_argument("--label-smoothing", type=float, default=None, help="label smoothing of the L_Y term")
    g.add_argument("--train-prior", type=int, choices=(0, 1), default=None, help="1: learn the class prior (IB-INN), 0: keep it uniform")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and noise (default 0)")
    p.add_argument("--noise-sigma", type=float, default=0.01, help="Gaussian input noise during training (default 0.01)")
    p.add_argument("--preprocess", choices=("logit", "affine"), default="affine",
                   help="map of [0, 1] pixels into the flow: affine (IB-INN's 2x-1, default) or logit (RealNVP; measured worse for ECINN here)")
    glow = p.add_argument_group("--arch glow")
    glow.add_argument("--levels", type=int, default=2, help="downsampling levels (default 2)")
    glow.add_argument("--steps-per-level", type=int, default=8, help="flow steps per level (default 8)")
    glow.add_argument("--hidden", type=int, default=32, help="subnet width at level 0, doubling per level (default 32)")
    glow.add_argument("--downsample", choices=("haar", "squeeze"), default="haar", help="default haar")
    glow.add_argument("--split-levels", action="store_true", help="multi-scale factor-out (Glow); default keeps the full latent")
    ib = p.add_argument_group("--arch ibinn / ibinn-small (each switch removes one difference from the Glow flow)")
    ib.add_argument("--blocks", type=int, default=None, help="all-in-one blocks per resolution (default 24, ibinn-small 8)")
    ib.add_argument("--no-dense", action="store_true", help="leave out DCT pooling and the dense coupling")
    ib.add_argument("--no-batchnorm", action="store_true", help="subnets with biases instead of BatchNorm")
    ib.add_argument("--mixing", choices=("orthogonal", "permutation"), default="orthogonal",
                    help="fixed channel mixing after each block (default orthogonal)")
    p.add_argument("--augment-shift", type=int, default=0, help="random shifts of up to this many pixels, zero fill (default 0: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    p.add_argument("--export", default=None, help="also write an inference-only copy (no optimizer state) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from cfjax.data import concat_datasets, load_npz_dataset

    from cfjax.pipelines.training import check_out_dir

    if args.export:  # before training, not after it
        ckpt.check_export_target(args.export)
    check_out_dir(Path(args.out), args.resume)
    apply_recipe(args)
    for name in ("checkpoint_every", "batch_size", "epochs", "steps"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise CfjaxError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("lr", "beta", "noise_sigma", "label_smoothing"):
        v = getattr(args, name)
        if not np.isfinite(v) or v < 0 or (v == 0 and name in ("lr", "beta")):
            raise CfjaxError(f"--{name.replace('_', '-')} must be a {'positive' if name in ('lr', 'beta') else 'non-negative'} finite number, got {v}")
    extra = [load_npz_dataset(f) for f in args.extra_train]  # checked before the (slower) dataset load
    train = load_dataset(args.data, "train", args.data_dir)
    test = load_dataset(args.data, "test", args.data_dir)
    if extra:
        train = concat_datasets(train, [load_npz_dataset(f, train.num_classes) for f in args.extra_train])
    config = flow_config_from_args(args, train.image_shape, train.num_classes)
    steps_per_epoch = len(train) // max(args.batch_size, 1)
    steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    epochs = args.epochs if args.steps is None else -(-steps // max(steps_per_epoch, 1))
    spec = build_spec(config, train, args.lr, steps, args.seed, augment_shift=args.augment_shift,
                      optimizer=args.optimizer, mean_lr_factor=args.mean_lr_factor, clip=args.clip)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train, test, args.out, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
        resume=args.resume, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
        total_steps=steps if args.steps is not None else None,
    )
    print(
        f"flow trained in {time.perf_counter() - t0:.0f}s: test accuracy {metrics['test_accuracy']:.4f}, "
        f"test bits/dim {metrics['test_bits_per_dim']:.3f} -> {args.out}"
    )
    if args.export:
        print(f"exported inference-only model -> {export_inference_model(args.out, args.export)}")
    return 0
