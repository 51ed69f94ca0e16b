"""Train DUQ, the manifold-consistency model DISC uses, from data or data-free.

    cfjax train duq --data mnist5k --out DIR [--source data|inversion --classifier DIR
                    --epochs N --batch-size B --lr LR --seed S --resume --export DIR2]

``--source data`` (default, the paper's setting) trains on the training images. ``--source
inversion`` is data-free: ``--synth-images`` images are synthesised from the classifier
(``--classifier DIR``, default the shipped one for ``--data``) by DeepInversion
(:mod:`cfjax.pipelines.synthesize`), labelled by that classifier, and DUQ is trained on them;
the images are kept in ``DIR/synthetic_train.npz`` so ``--resume`` does not synthesise again.
The real test split is still used for the final evaluation, so the reported accuracy is honest.

Optimiser: AdamW with warm-up and a cosine schedule. After every step the
centroids take one EMA step with the new weights. The state is ``{'params', 'centroids',
'opt_state'}``; ``--export`` writes an inference-only copy (``params`` + ``centroids``).
"""

from __future__ import annotations

import argparse
import json
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
from cfjax.models.duq import DUQConfig, duq_kernel, duq_loss, init_duq, update_centroids
from cfjax.pipelines.training import random_shift
from cfjax.pipelines.training import TrainSpec, fit

KIND = "duq"
SOURCES = ("data", "inversion")
VARIABLE_KEYS = ("params", "centroids")
NOISE_SEED = 1234
SYNTH_FILE = "synthetic_train.npz"  # --source inversion: the synthesised training set, kept for --resume


def make_optimizer(lr: float, total_steps: int, weight_decay: float = 1e-4):
    """AdamW with a warm-up (5% of the steps, at most 100) and cosine decay to 1% of ``lr``.

    (SGD with momentum, the paper's choice with a BatchNorm feature extractor, stalls at the
    trivial K_c = 1/C solution with our BN-free one; Adam does not.)
    """
    warmup = max(1, min(100, total_steps // 20))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * 0.01)
    return optax.adamw(sched, weight_decay=weight_decay)


def variables_of(state: dict) -> dict:
    return {k: state[k] for k in VARIABLE_KEYS}


@partial(jax.jit, static_argnums=1)
def _kernel_batch(variables, config: DUQConfig, x):
    return duq_kernel(variables, config, x)


def duq_kernel_batched(variables: dict, config: DUQConfig, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """K (N, C) for many images, in compiled batches."""
    return np.concatenate(
        [np.asarray(_kernel_batch(variables, config, jnp.asarray(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)]
    )


def evaluate_duq(variables: dict, config: DUQConfig, data: Dataset) -> dict:
    """Accuracy of argmax_c K_c, mean certainty max_c K_c on ``data`` and on uniform-noise images."""
    k = duq_kernel_batched(variables, config, data.images)
    noise = np.random.default_rng(NOISE_SEED).uniform(size=(200, *config.image_shape)).astype(np.float32)
    k_noise = duq_kernel_batched(variables, config, noise)
    return {
        "test_accuracy": float(np.mean(np.argmax(k, -1) == data.labels)),
        "test_certainty": float(np.mean(np.max(k, -1))),
        "noise_certainty": float(np.mean(np.max(k_noise, -1))),
    }


def build_spec(
    config: DUQConfig,
    lr: float,
    total_steps: int,
    seed: int,
    *,
    weight_decay: float = 1e-4,
    augment_shift: int = 0,
    info: dict | None = None,
) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit`."""
    if not lr > 0:
        raise CfjaxError(f"--lr must be positive, got {lr}")
    if weight_decay < 0:
        raise CfjaxError(f"--weight-decay must be >= 0, got {weight_decay}")
    if augment_shift < 0:
        raise CfjaxError(f"--augment-shift must be >= 0, got {augment_shift}")
    opt = make_optimizer(lr, total_steps, weight_decay)

    def init_state():
        variables = init_duq(jax.random.PRNGKey(seed), config)
        return {**variables, "opt_state": opt.init(variables["params"])}

    @jax.jit
    def train_step(state, x, y, key):
        x = random_shift(key, jnp.asarray(x, jnp.float32), augment_shift)
        y = jnp.asarray(y, jnp.int32)
        variables = variables_of(state)

        def loss_fn(params):
            return duq_loss({**variables, "params": params}, config, x, y)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        variables = {**variables, "params": optax.apply_updates(state["params"], updates)}
        variables = update_centroids(variables, config, x, y)
        return {**variables, "opt_state": opt_state}, {"loss": loss, **aux}

    return TrainSpec(
        kind=KIND,
        config=config.to_dict(),
        init_state=init_state,
        train_step=train_step,
        evaluate=lambda state, data: evaluate_duq(variables_of(state), config, data),
        info={"lr": lr, "weight_decay": weight_decay, "augment_shift": augment_shift, **(info or {})},
        show=("loss", "bce", "gp", "acc"),
    )


def _abstract_state(config: DUQConfig, inference_only: bool) -> dict:
    variables = jax.eval_shape(lambda k: init_duq(k, config), jax.random.PRNGKey(0))
    if inference_only:
        return variables
    return {**variables, "opt_state": jax.eval_shape(make_optimizer(1e-3, 10).init, variables["params"])}


def load_duq(model_dir: str | Path) -> tuple[dict, DUQConfig, dict]:
    """Load a trained DUQ model: ``(variables, config, info)``; ``duq_kernel(variables, config, x)``.

    A missing, foreign (another kind), unfinished or corrupt directory raises CheckpointError.
    """
    info = ckpt.read_model_info(model_dir, expected_kind=KIND)
    try:
        config = DUQConfig.from_dict(info["config"])
    except CfjaxError as e:
        raise ckpt.CheckpointError(f"{model_dir}: {e}") from e
    if info.get("status") != "complete":
        raise ckpt.CheckpointError(
            f"{model_dir} holds an unfinished training run (status {info.get('status')!r}); finish it with --resume"
        )
    state, _, _ = ckpt.load_checkpoint(model_dir, _abstract_state(config, bool(info.get("inference_only"))))
    return variables_of(state), config, info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained DUQ model's variables (no optimizer state) into a new model directory."""
    variables, config, info = load_duq(src)
    return ckpt.export_inference_model(src, dst, KIND, config.to_dict(), variables, info)


def synthetic_training_set(args, image_shape, num_classes) -> tuple[Dataset, dict]:
    """DeepInversion images from the classifier, labelled by it (``--source inversion``)."""
    from cfjax.pipelines.explain_common import save_npz_atomic
    from cfjax.pipelines.synthesize import InversionConfig, synthesize
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pretrained import default_model_dir

    cache = Path(args.out) / SYNTH_FILE
    if args.resume and cache.exists():  # the images of the interrupted run (synthesis is the slow part)
        with np.load(cache, allow_pickle=False) as d:
            summary = json.loads(str(d["summary"]))
            return Dataset(f"{args.data}-inversion", "train", d["images"], d["labels"], num_classes), summary
    clf_dir = Path(args.classifier) if args.classifier else default_model_dir("classifier", args.data)
    apply_fn, variables, clf_config, _ = load_classifier(clf_dir)
    if tuple(clf_config.image_shape) != tuple(image_shape) or clf_config.num_classes != num_classes:
        raise CfjaxError(
            f"--classifier {clf_dir} takes {clf_config.image_shape} images with {clf_config.num_classes} classes, "
            f"but --data {args.data} has {tuple(image_shape)} with {num_classes}"
        )
    inv = InversionConfig(steps=args.synth_steps, lr=args.synth_lr, bn_weight=args.synth_bn_weight, tv_weight=args.synth_tv_weight)
    t0 = time.perf_counter()
    images, targets, labels, summary = synthesize(
        apply_fn, variables, image_shape, num_classes, args.synth_images,
        batch_size=args.synth_batch_size, cfg=inv, seed=args.seed, quiet=args.quiet,
    )
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["classifier"] = str(clf_dir)
    summary["images"] = int(len(images))
    summary["inversion"] = {k: getattr(inv, k) for k in inv.__dataclass_fields__}
    summary["class_counts"] = np.bincount(labels, minlength=num_classes).tolist()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(cache, images=images, labels=labels, targets=targets, summary=json.dumps(summary))
    return Dataset(f"{args.data}-inversion", "train", images, labels, num_classes), summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.explain_common import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--out", required=True, help="model directory to write (refuses to overwrite; see --resume)")
    p.add_argument("--source", default="data", help="data (train on the training images, default) or inversion (data-free)")
    p.add_argument("--classifier", default=None, help="--source inversion: classifier directory (default: the shipped one)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.1, help="kernel length scale (default 0.1)")
    p.add_argument("--gamma", type=float, default=0.999, help="centroid EMA decay (default 0.999)")
    p.add_argument("--lambda-gp", type=float, default=0.75, help="gradient-penalty weight (default 0.75)")
    p.add_argument("--augment-shift", type=int, default=0, help="random shifts of up to this many pixels (0: none)")
    p.add_argument("--synth-images", type=int, default=2000, help="--source inversion: images to synthesise")
    p.add_argument("--synth-batch-size", type=int, default=200)
    p.add_argument("--synth-steps", type=int, default=100, help="Adam steps per synthetic batch")
    p.add_argument("--synth-lr", type=float, default=0.2)
    p.add_argument("--synth-bn-weight", type=float, default=1.0)
    p.add_argument("--synth-tv-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--export", default=None, help="also write an inference-only copy (no optimizer state) here")
    p.add_argument("--quiet", action="store_true")


def config_from_args(args, image_shape, num_classes) -> DUQConfig:
    return DUQConfig(
        num_classes=num_classes, image_shape=tuple(image_shape), width=args.width, feature_dim=args.feature_dim,
        embed_dim=args.embed_dim, sigma=args.sigma, gamma=args.gamma, lambda_gp=args.lambda_gp,
    )


def run(args) -> int:
    if args.source not in SOURCES:
        raise CfjaxError(f"unknown --source {args.source!r}: choose data or inversion")
    if args.source == "data" and args.classifier:
        raise CfjaxError("--classifier is only used with --source inversion")
    config_from_args(args, (28, 28, 1), 10)  # check the options before any work
    if args.epochs <= 0:
        raise CfjaxError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {args.batch_size}")
    if args.export:
        ckpt.check_export_target(args.export)
    from cfjax.pipelines.training import check_out_dir

    check_out_dir(Path(args.out), args.resume)  # before a long synthesis
    test = load_dataset(args.data, "test", args.data_dir)
    info = {"source": args.source}
    if args.source == "data":
        train = load_dataset(args.data, "train", args.data_dir)
    else:
        train, synth = synthetic_training_set(args, test.image_shape, test.num_classes)
        info["synthesis"] = synth
        print(
            f"synthesised {len(train)} images in {synth['seconds']:.0f}s "
            f"(classifier agrees with the target class on {synth['target_agreement']:.1%})"
        )
    config = config_from_args(args, test.image_shape, test.num_classes)
    steps = args.epochs * (len(train) // args.batch_size)
    spec = build_spec(config, args.lr, steps, args.seed, weight_decay=args.weight_decay, augment_shift=args.augment_shift, info=info)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train, test, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        resume=args.resume, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
    )
    print(
        f"DUQ ({args.source}) trained in {time.perf_counter() - t0:.0f}s: test accuracy {metrics['test_accuracy']:.4f}, "
        f"certainty test {metrics['test_certainty']:.3f} / noise {metrics['noise_certainty']:.3f} -> {args.out}"
    )
    if args.export:
        print(f"exported inference-only model -> {export_inference_model(args.out, args.export)}")
    return 0
