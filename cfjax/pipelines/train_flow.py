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
from cfjax.models.latent import LatentConfig
from cfjax.pipelines.training import TrainSpec, fit, random_shift

XLA_WORKLOAD = "train_flow"  # XLA:CPU flags the cli applies for this command (cfjax.xla_cpu)

KIND = "flow"


def make_optimizer(lr: float, total_steps: int, mean_lr_factor: float = 10.0, clip: float = 10.0):
    """Adam with warm-up + cosine decay; the class means learn ``mean_lr_factor`` x faster (IB-INN)."""
    warmup = max(1, min(200, total_steps // 10))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * 0.02)
    sched_mu = lambda s: mean_lr_factor * sched(s)  # noqa: E731

    def labels(params):
        return {
            "glow": jax.tree_util.tree_map(lambda _: "flow", params["glow"]),
            "latent": jax.tree_util.tree_map(lambda _: "latent", params["latent"]),
            "class_means": "frozen",
        }

    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.multi_transform(
            {"flow": optax.adamw(sched, weight_decay=1e-5), "latent": optax.adam(sched_mu), "frozen": optax.set_to_zero()},
            labels,
        ),
    )


def flow_config_from_args(args, image_shape, num_classes) -> fc.FlowClassifierConfig:
    return fc.FlowClassifierConfig(
        glow=GlowConfig(
            image_shape=tuple(image_shape),
            num_levels=args.levels,
            steps_per_level=args.steps_per_level,
            hidden_channels=args.hidden,
            max_hidden_channels=max(args.hidden, 2 * args.hidden),
            downsample=args.downsample,
            split=args.split_levels,
        ),
        latent=LatentConfig(num_classes=num_classes, beta=args.beta),
        noise_sigma=args.noise_sigma,
        preprocess=args.preprocess,
    )


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


def build_spec(config: fc.FlowClassifierConfig, train: Dataset, lr: float, total_steps: int, seed: int, augment_shift: int = 0) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit`: IB-INN loss, Adam, optional random
    shifts of up to ``augment_shift`` pixels (zero fill) before dequantisation."""
    if augment_shift < 0:
        raise CfjaxError(f"--augment-shift must be >= 0, got {augment_shift}")
    opt = make_optimizer(lr, total_steps)

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
        return {"params": params, "opt_state": opt_state}, {"loss": loss, "bpd": aux["bpd"], "acc": aux["acc"]}

    def finalize(state, train_data):
        params = dict(state["params"])
        params["class_means"] = predicted_class_means(params, config, train_data.images)
        return {**state, "params": params}

    return TrainSpec(
        kind=KIND,
        config=config.to_dict(),
        init_state=init_state,
        train_step=train_step,
        evaluate=lambda state, data: evaluate_flow(state["params"], config, data),
        finalize=finalize,
        info={"lr": lr, "augment_shift": augment_shift},
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
        opt_t = jax.eval_shape(make_optimizer(lr, 10).init, params_t)
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
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=8.0, help="IB trade-off: larger favours accuracy over likelihood (default 8)")
    p.add_argument("--noise-sigma", type=float, default=0.01)
    p.add_argument("--preprocess", choices=("logit", "affine"), default="affine",
                   help="map of [0, 1] pixels into the flow: affine (IB-INN's 2x-1, default) or logit (RealNVP; measured worse for ECINN here)")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps-per-level", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32, help="subnet width at level 0 (doubles per level)")
    p.add_argument("--downsample", choices=("haar", "squeeze"), default="haar")
    p.add_argument("--split-levels", action="store_true", help="multi-scale factor-out (Glow); default keeps the full latent")
    p.add_argument("--augment-shift", type=int, default=0, help="random shifts of up to this many pixels, zero fill (default 0: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--export", default=None, help="also write an inference-only copy (no optimizer state) here")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    if args.export:  # before training, not after it
        ckpt.check_export_target(args.export)
    train = load_dataset(args.data, "train", args.data_dir)
    test = load_dataset(args.data, "test", args.data_dir)
    config = flow_config_from_args(args, train.image_shape, train.num_classes)
    steps = args.epochs * (len(train) // max(args.batch_size, 1))
    spec = build_spec(config, train, args.lr, steps, args.seed, augment_shift=args.augment_shift)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train, test, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        resume=args.resume, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
    )
    print(
        f"flow trained in {time.perf_counter() - t0:.0f}s: test accuracy {metrics['test_accuracy']:.4f}, "
        f"test bits/dim {metrics['test_bits_per_dim']:.3f} -> {args.out}"
    )
    if args.export:
        print(f"exported inference-only model -> {export_inference_model(args.out, args.export)}")
    return 0
