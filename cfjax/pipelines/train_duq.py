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

import dataclasses
import json
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
from cfjax.batching import map_chunks
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError
from cfjax.models.duq import DUQConfig, duq_kernel, duq_loss, init_duq, update_centroids
from cfjax.pipelines.synthesize import InversionConfig
from cfjax.pipelines.training import TrainingRecipe, TrainSpec, fit, random_shift
from cfjax.validation import non_negative_float, non_negative_int, positive_float, positive_int

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
    return map_chunks(lambda xb: _kernel_batch(variables, config, jnp.asarray(xb)), (images,), batch_size, pad=False)


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
    positive_float(lr, "lr")
    non_negative_float(weight_decay, "weight_decay")
    non_negative_int(augment_shift, "augment_shift")
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


def load_duq(model_dir: str | Path) -> tuple[dict, DUQConfig, dict]:
    """``(variables, config, info)`` of a DUQ directory (:func:`cfjax.model_dirs.load` in the tuple
    shape callers of this name expect); ``duq_kernel(variables, config, x)``."""
    m = model_dirs.load(KIND, model_dir)
    return m.params, m.config, m.info


def export_inference_model(src: str | Path, dst: str | Path) -> Path:
    """Copy a trained DUQ model's variables (no optimizer state) into a new model directory."""
    return model_dirs.export(src, dst, KIND)


# The defaults of ``cfjax train duq``.
DEFAULT_TRAINING = TrainingRecipe(epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4, augment_shift=0)


@dataclass(frozen=True)
class Synthesis:
    """``source="inversion"``: how many images DeepInversion synthesises from which classifier
    (None: the shipped one for the dataset), in batches of ``batch_size``, with ``inversion``."""

    images: int = 2000
    batch_size: int = 200
    classifier: str | None = None
    inversion: InversionConfig = InversionConfig()

    def __post_init__(self):
        positive_int(self.images, "images")
        positive_int(self.batch_size, "batch_size")


def synthetic_training_set(out, data: str, image_shape, num_classes: int, synthesis: Synthesis, *, resume: bool,
                           seed: int, quiet: bool) -> tuple[Dataset, dict]:
    """DeepInversion images from the classifier, labelled by it (``source="inversion"``)."""
    from cfjax.pipelines.explain_common import save_npz_atomic
    from cfjax.pipelines.synthesize import synthesize
    from cfjax.pretrained import default_model_dir

    cache = Path(out) / SYNTH_FILE
    if resume and cache.exists():  # the images of the interrupted run (synthesis is the slow part)
        with np.load(cache, allow_pickle=False) as d:
            summary = json.loads(str(d["summary"]))
            return Dataset(f"{data}-inversion", "train", d["images"], d["labels"], num_classes), summary
    clf_dir = Path(synthesis.classifier) if synthesis.classifier else default_model_dir("classifier", data)
    clf = model_dirs.load("classifier", clf_dir)
    if clf.image_shape != tuple(image_shape) or clf.num_classes != num_classes:
        raise CfjaxError(
            f"--classifier {clf_dir} takes {clf.image_shape} images with {clf.num_classes} classes, "
            f"but --data {data} has {tuple(image_shape)} with {num_classes}"
        )
    inv = synthesis.inversion
    t0 = time.perf_counter()
    images, targets, labels, summary = synthesize(
        clf.apply, clf.params, image_shape, num_classes, synthesis.images,
        batch_size=synthesis.batch_size, cfg=inv, seed=seed, quiet=quiet,
    )
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["classifier"] = str(clf_dir)
    summary["images"] = int(len(images))
    summary["inversion"] = {k: getattr(inv, k) for k in inv.__dataclass_fields__}
    summary["class_counts"] = np.bincount(labels, minlength=num_classes).tolist()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(cache, images=images, labels=labels, targets=targets, summary=json.dumps(summary))
    return Dataset(f"{data}-inversion", "train", images, labels, num_classes), summary


def train(config: DUQConfig, training: TrainingRecipe = DEFAULT_TRAINING, *, out, data: str = "mnist5k", data_dir=None,
          source: str = "data", synthesis: Synthesis = Synthesis(), resume: bool = False, export=None,
          quiet: bool = False) -> dict:
    """Train (or continue) DUQ of ``config`` (image shape and classes from ``data``) into ``out``:
    on the training images (``source="data"``) or data-free on images synthesised by
    ``synthesis`` (``source="inversion"``); always evaluated on the real test split."""
    from cfjax.pipelines.training import check_out_dir

    if source not in SOURCES:
        raise CfjaxError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}", argument="source")
    if source == "data" and synthesis.classifier:
        raise CfjaxError("a classifier is only used with source 'inversion'", argument="classifier")
    if export:
        ckpt.check_export_target(export)
    check_out_dir(Path(out), resume)  # before a long synthesis
    test = load_dataset(data, "test", data_dir)
    info: dict[str, Any] = {"source": source}
    if source == "data":
        train_ds = load_dataset(data, "train", data_dir)
    else:
        train_ds, synth = synthetic_training_set(out, data, test.image_shape, test.num_classes, synthesis,
                                                 resume=resume, seed=training.seed, quiet=quiet)
        info["synthesis"] = synth
        print(
            f"synthesised {len(train_ds)} images in {synth['seconds']:.0f}s "
            f"(classifier agrees with the target class on {synth['target_agreement']:.1%})"
        )
    config = dataclasses.replace(config, image_shape=tuple(test.image_shape), num_classes=test.num_classes)
    steps = training.epochs * (len(train_ds) // training.batch_size)
    spec = build_spec(config, training.lr, steps, training.seed, weight_decay=training.weight_decay,
                      augment_shift=training.augment_shift, info=info)
    t0 = time.perf_counter()
    _, metrics = fit(
        spec, train_ds, test, out, epochs=training.epochs, batch_size=training.batch_size, seed=training.seed,
        resume=resume, checkpoint_every=training.checkpoint_every, quiet=quiet,
    )
    print(
        f"DUQ ({source}) trained in {time.perf_counter() - t0:.0f}s: test accuracy {metrics['test_accuracy']:.4f}, "
        f"certainty test {metrics['test_certainty']:.3f} / noise {metrics['noise_certainty']:.3f} -> {out}"
    )
    if export:
        print(f"exported inference-only model -> {export_inference_model(out, export)}")
    return metrics
