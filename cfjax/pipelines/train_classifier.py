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

import dataclasses
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from cfjax import checkpoint as ckpt
from cfjax import model_dirs
from cfjax.data import Dataset, load_dataset
from cfjax.models.classifier import (
    ClassifierConfig,
    classifier_apply,
    classifier_train_apply,
    init_classifier,
)
from cfjax.pipelines.training import TrainingRecipe, TrainSpec, fit, random_shift
from cfjax.validation import non_negative_float, non_negative_int, positive_float

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
    weight_decay: float = 5e-4,  # = ClassifierTraining.weight_decay
    augment_shift: int = 2,
) -> TrainSpec:
    """The TrainSpec for :func:`cfjax.pipelines.training.fit` (cross-entropy, AdamW, shifts)."""
    positive_float(lr, "lr")
    non_negative_float(weight_decay, "weight_decay")
    non_negative_int(augment_shift, "augment_shift")
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


def load_classifier(model_dir: str | Path):
    """``(apply_fn, variables, config, info)`` of a classifier directory: :func:`cfjax.model_dirs.load`
    in the tuple shape callers of this name expect; ``apply_fn(variables, x, train=False) -> logits``."""
    m = model_dirs.load(KIND, model_dir)
    return classifier_apply(m.config), m.params, m.config, m.info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained classifier's variables (no optimizer state) into a new model directory."""
    return model_dirs.export(src, dst, KIND)


# The defaults of ``cfjax train classifier``.
DEFAULT_TRAINING = TrainingRecipe(epochs=15, batch_size=64, lr=2e-3, weight_decay=5e-4, augment_shift=2)


def train(config: ClassifierConfig, training: TrainingRecipe = DEFAULT_TRAINING, *, out, data: str = "mnist5k",
          data_dir=None, resume: bool = False, export=None, quiet: bool = False) -> dict:
    """Train (or continue) a classifier of ``config`` (its image shape and classes are taken from
    ``data``) into the model directory ``out``; ``export`` also writes an inference-only copy."""
    if export:
        ckpt.check_export_target(export)
    train_ds = load_dataset(data, "train", data_dir)
    test = load_dataset(data, "test", data_dir)
    config = dataclasses.replace(config, image_shape=tuple(train_ds.image_shape), num_classes=train_ds.num_classes)
    steps = training.epochs * (len(train_ds) // training.batch_size)
    spec = build_spec(config, training.lr, steps, training.seed, weight_decay=training.weight_decay,
                      augment_shift=training.augment_shift)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train_ds, test, out, epochs=training.epochs, batch_size=training.batch_size, seed=training.seed,
        resume=resume, checkpoint_every=training.checkpoint_every, quiet=quiet,
    )
    print(
        f"{config.arch} classifier trained in {time.perf_counter() - t0:.0f}s: "
        f"test accuracy {metrics['test_accuracy']:.4f} -> {out}"
    )
    if export:
        print(f"exported inference-only model -> {export_inference_model(out, export)}")
    return metrics
