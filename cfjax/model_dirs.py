"""One way to load and export a model directory of every kind cfjax trains.

    m = model_dirs.load("flow", DIR)          # or "classifier", "duq"; "any": whatever DIR holds
    m.config, m.params, m.info                # the config dataclass, the weights, cfjax_model.json
    m.apply(m.params, x)                      # logits (B, C) (flow, classifier)
    model_dirs.export(DIR, DST)               # weights only, for shipping (cfjax/pretrained/)

Loading reads only the weights (:func:`cfjax.checkpoint.load_weights`): a training run's
directory loads without its trainer's optimiser, and an exported one holds nothing else. A
missing, foreign (another kind), unfinished, corrupt or mismatched directory is a
:class:`~cfjax.errors.CheckpointError` naming the directory; the checks that need no arrays
(kind, config, status) run before any restore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax

from cfjax import checkpoint as ckpt
from cfjax.errors import CfjaxError, CheckpointError

KINDS = ("flow", "classifier", "duq")

__all__ = ["KINDS", "LoadedModel", "load", "export", "read_config"]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model directory.

    ``params``: the weights pytree (flow: its parameters; classifier: ``{'params',
    'batch_stats'}``; DUQ: ``{'params', 'centroids'}``). ``apply(params, x (B, H, W, C)) ->
    logits (B, C)`` for flows and classifiers (None for DUQ: see ``cfjax.models.duq``);
    ``bits_per_dim(params, x) -> (B,)`` for flows only.
    """

    kind: str
    path: Path
    config: Any
    params: Any
    info: dict = field(default_factory=dict)
    apply: Callable | None = None
    bits_per_dim: Callable | None = None

    @property
    def image_shape(self) -> tuple:
        return tuple(self.config.image_shape)

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)


def _config_class(kind: str):
    if kind == "flow":
        from cfjax.models.flow_classifier import FlowClassifierConfig

        return FlowClassifierConfig
    if kind == "classifier":
        from cfjax.models.classifier import ClassifierConfig

        return ClassifierConfig
    from cfjax.models.duq import DUQConfig

    return DUQConfig


def read_config(model_dir, kind: str | None = None) -> tuple[str, Any, dict]:
    """(kind, config, info) of ``model_dir`` without touching its arrays; CheckpointError for a
    missing, foreign, unfinished or corrupt directory."""
    model_dir = Path(model_dir)
    info = ckpt.read_model_info(model_dir, expected_kind=kind)
    kind = info["kind"]
    if kind not in KINDS:
        raise CheckpointError(f"{model_dir} holds a {kind!r} model, which cfjax cannot load (kinds: {', '.join(KINDS)})")
    try:
        config = _config_class(kind).from_dict(info["config"])
    except CfjaxError as e:
        raise CheckpointError(f"{model_dir}: {e}") from e
    if info.get("status") != "complete":
        raise CheckpointError(f"{model_dir} holds an unfinished training run (status {info.get('status')!r}); finish it with --resume")
    return kind, config, info


def _abstract_weights(kind: str, config) -> dict:
    """The expected weights of ``config``: {item: pytree of ShapeDtypeStruct}."""
    if kind == "flow":
        from cfjax.models import flow_classifier as fc

        # The Glow init draws with NumPy, so it runs concretely (on two images, once per load).
        x = jax.random.uniform(jax.random.PRNGKey(0), (2, *config.image_shape))
        params = fc.init_flow_classifier(jax.random.PRNGKey(0), config, x)
        return {"params": jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)}
    if kind == "classifier":
        from cfjax.models.classifier import init_classifier

        return dict(jax.eval_shape(lambda k: init_classifier(k, config), jax.random.PRNGKey(0)))
    from cfjax.models.duq import init_duq

    return dict(jax.eval_shape(lambda k: init_duq(k, config), jax.random.PRNGKey(0)))


def _functions(kind: str, config) -> tuple[Callable | None, Callable | None]:
    if kind == "flow":
        from cfjax.models import flow_classifier as fc

        return (lambda p, x: fc.class_logits(p, config, x)), (lambda p, x: fc.nll_bits_per_dim(p, config, x))
    if kind == "classifier":
        from cfjax.models.classifier import classifier_apply

        return classifier_apply(config), None
    return None, None


def load(kind: str, model_dir) -> LoadedModel:
    """Load the model directory ``model_dir`` of ``kind`` ("flow", "classifier", "duq", or "any")."""
    model_dir = Path(model_dir)
    kind, config, info = read_config(model_dir, None if kind == "any" else kind)
    weights = ckpt.load_weights(model_dir, _abstract_weights(kind, config))
    params = weights["params"] if kind == "flow" else weights
    apply, bits_per_dim = _functions(kind, config)
    return LoadedModel(kind, model_dir, config, params, info, apply, bits_per_dim)


def export(src, dst, kind: str = "any") -> Path:
    """Copy the weights of the model directory ``src`` (no optimiser state) into a new model
    directory ``dst`` (refused when ``dst`` already holds a model)."""
    ckpt.check_export_target(dst)
    m = load(kind, src)
    weights = {"params": m.params} if m.kind == "flow" else m.params
    return ckpt.export_inference_model(src, dst, m.kind, m.config.to_dict(), weights, m.info)
