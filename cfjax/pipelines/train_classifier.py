"""Train a BatchNorm image classifier (the model DISC explains) or an oracle classifier.

    cfjax train classifier --data mnist5k --out DIR [--arch cnn|resnet|mlp --epochs N
                           --batch-size B --lr LR --seed S --resume --export DIR2]

AdamW with a linear warm-up and cosine decay, light augmentation (random shifts of up to
``--augment-shift`` pixels, zero padded). The training state is ``{'params', 'batch_stats',
'opt_state'}`` (no ``batch_stats`` for the BN-free "mlp"). ``--export DIR2`` also writes an
inference-only copy (``params`` + ``batch_stats``, no optimizer state): what ships in
``cfjax/pretrained/``. Load either with :func:`load_classifier`.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from cfjax import checkpoint as ckpt
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError
from cfjax.models.classifier import (
    ClassifierConfig,
    classifier_apply,
    classifier_train_apply,
    init_classifier,
)
from cfjax.pipelines.training import TrainSpec, fit, random_shift

KIND = "classifier"
VARIABLE_KEYS = ("params", "batch_stats")


def make_optimizer(lr: float, total_steps: int, weight_decay: float = 5e-4):
    """AdamW with a warm-up (5% of the steps, at most 100) and cosine decay to 1% of ``lr``."""
    warmup = max(1, min(100, total_steps // 20))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * 0.01)
    return optax.adamw(sched, weight_decay=weight_decay)


def variables_of(state: dict) -> dict:
    """The model variables (``params`` [+ ``batch_stats``]) inside a training state."""
    return {k: state[k] for k in VARIABLE_KEYS if k in state}


@partial(jax.jit, static_argnums=0)
def _eval_batch(config: ClassifierConfig, variables, x, y):
    logits = classifier_apply(config)(variables, x)
    logp = jax.nn.log_softmax(logits)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    nll = -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=-1))
    return correct, nll


def evaluate_classifier(variables: dict, config: ClassifierConfig, data: Dataset, batch_size: int = 500) -> dict:
    """Accuracy and mean negative log-likelihood (eval-mode BatchNorm) on ``data``."""
    correct, nll = 0, 0.0
    for i in range(0, len(data), batch_size):
        c, l = _eval_batch(config, variables, jnp.asarray(data.images[i : i + batch_size]), jnp.asarray(data.labels[i : i + batch_size]))
        correct += int(c)
        nll += float(l)
    return {"test_accuracy": correct / len(data), "test_nll": nll / len(data)}


def build_spec(
    config: ClassifierConfig,
    lr: float,
    total_steps: int,
    seed: int,
    *,
    weight_decay: float = 5e-4,
    augment_shift: int = 2,
) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit` (cross-entropy, AdamW, shifts)."""
    if not lr > 0:
        raise CfjaxError(f"--lr must be positive, got {lr}")
    if weight_decay < 0:
        raise CfjaxError(f"--weight-decay must be >= 0, got {weight_decay}")
    if augment_shift < 0:
        raise CfjaxError(f"--augment-shift must be >= 0, got {augment_shift}")
    opt = make_optimizer(lr, total_steps, weight_decay)
    train_apply = classifier_train_apply(config)

    def init_state():
        variables = init_classifier(jax.random.PRNGKey(seed), config)
        return {**variables, "opt_state": opt.init(variables["params"])}

    @jax.jit
    def train_step(state, x, y, key):
        x = random_shift(key, jnp.asarray(x, jnp.float32), augment_shift)
        y = jnp.asarray(y, jnp.int32)

        def loss_fn(params):
            logits, new_stats = train_apply({**variables_of(state), "params": params}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        if "batch_stats" in state:
            new_state["batch_stats"] = new_stats
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return new_state, {"loss": loss, "acc": acc}

    return TrainSpec(
        kind=KIND,
        config=config.to_dict(),
        init_state=init_state,
        train_step=train_step,
        evaluate=lambda state, data: evaluate_classifier(variables_of(state), config, data),
        info={"lr": lr, "weight_decay": weight_decay, "augment_shift": augment_shift},
        show=("loss", "acc"),
    )


def _abstract_state(config: ClassifierConfig, inference_only: bool) -> dict:
    variables = jax.eval_shape(lambda k: init_classifier(k, config), jax.random.PRNGKey(0))
    if inference_only:
        return variables
    opt_t = jax.eval_shape(make_optimizer(1e-3, 10).init, variables["params"])
    return {**variables, "opt_state": opt_t}


def load_classifier(model_dir: str | Path):
    """Load a trained classifier: ``(apply_fn, variables, config, info)``.

    ``apply_fn(variables, x (B, H, W, C), train=False) -> logits (B, C)``. A missing, foreign
    (another kind), unfinished or corrupt directory raises CheckpointError.
    """
    info = ckpt.read_model_info(model_dir, expected_kind=KIND)
    try:
        config = ClassifierConfig.from_dict(info["config"])
    except CfjaxError as e:
        raise ckpt.CheckpointError(f"{model_dir}: {e}") from e
    if info.get("status") != "complete":
        raise ckpt.CheckpointError(
            f"{model_dir} holds an unfinished training run (status {info.get('status')!r}); finish it with --resume"
        )
    target = _abstract_state(config, bool(info.get("inference_only")))
    state, _, _ = ckpt.load_checkpoint(model_dir, target)
    return classifier_apply(config), variables_of(state), config, info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained classifier's variables (no optimizer state) into a new model directory."""
    _, variables, config, info = load_classifier(src)
    return ckpt.export_inference_model(src, dst, KIND, config.to_dict(), variables, info)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.explain_common import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--out", required=True, help="model directory to write (refuses to overwrite; see --resume)")
    p.add_argument("--arch", default="cnn", help="cnn (BatchNorm CNN, default), resnet (BatchNorm ResNet) or mlp (no BatchNorm)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layer (cnn, resnet)")
    p.add_argument("--hidden", type=int, default=128, help="dense width (cnn head, mlp layers)")
    p.add_argument("--depth", type=int, default=2, help="blocks per stage (resnet) / hidden layers (mlp)")
    p.add_argument("--augment-shift", type=int, default=2, help="random shifts of up to this many pixels (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--export", default=None, help="also write an inference-only copy (no optimizer state) here")
    p.add_argument("--quiet", action="store_true")


def config_from_args(args, image_shape, num_classes) -> ClassifierConfig:
    return ClassifierConfig(
        arch=args.arch, num_classes=num_classes, image_shape=tuple(image_shape),
        width=args.width, hidden=args.hidden, depth=args.depth,
    )


def run(args) -> int:
    # Check every option before loading data or touching --out.
    config_from_args(args, (28, 28, 1), 10)
    if args.epochs <= 0:
        raise CfjaxError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size <= 0:
        raise CfjaxError(f"--batch-size must be positive, got {args.batch_size}")
    if args.export:
        ckpt.check_export_target(args.export)
    train = load_dataset(args.data, "train", args.data_dir)
    test = load_dataset(args.data, "test", args.data_dir)
    config = config_from_args(args, train.image_shape, train.num_classes)
    steps = args.epochs * (len(train) // args.batch_size)
    spec = build_spec(config, args.lr, steps, args.seed, weight_decay=args.weight_decay, augment_shift=args.augment_shift)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train, test, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        resume=args.resume, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
    )
    print(
        f"{config.arch} classifier trained in {time.perf_counter() - t0:.0f}s: "
        f"test accuracy {metrics['test_accuracy']:.4f} -> {args.out}"
    )
    if args.export:
        print(f"exported inference-only model -> {export_inference_model(args.out, args.export)}")
    return 0
