"""cfjax.model_dirs: one way to load and export every model kind."""

import jax
import numpy as np
import pytest

from cfjax import checkpoint as ckpt
from cfjax import model_dirs
from cfjax.errors import CfjaxError, CheckpointError
from cfjax.models.classifier import ClassifierConfig, init_classifier
from cfjax.pretrained import PRETRAINED_DIR

SHIPPED = sorted(p for p in PRETRAINED_DIR.iterdir() if (p / ckpt.MODEL_FILE).exists())


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_model_loads(path):
    m = model_dirs.load("any", path)
    assert m.kind == ckpt.read_model_info(path)["kind"] and m.path == path
    assert m.info["status"] == "complete" and all(np.all(np.isfinite(a)) for a in _leaves(m.params))
    again = model_dirs.load(m.kind, path)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(m.params), _leaves(again.params)))
    if m.apply is not None:
        x = np.full((2, *m.image_shape), 0.5, np.float32)
        assert np.asarray(m.apply(m.params, x)).shape == (2, m.num_classes)
    assert (m.bits_per_dim is not None) == (m.kind == "flow")


def test_a_training_run_loads_without_its_optimizer(tmp_path):
    """A directory that was not exported holds an optimizer state: loading reads the weights by
    their expected shapes and the rest by its saved shapes, whatever the optimizer was."""
    config = ClassifierConfig(arch="mlp", hidden=8, depth=1)
    variables = init_classifier(jax.random.PRNGKey(0), config)
    opt_state = {"mu": np.ones((3, 5), np.float32), "count": np.zeros((), np.int32), "nested": [np.arange(4.0)]}
    ckpt.write_model_info(tmp_path / "run", "classifier", config.to_dict(), status="complete")
    ckpt.save_checkpoint(tmp_path / "run", 7, {**variables, "opt_state": opt_state})
    m = model_dirs.load("classifier", tmp_path / "run")
    assert set(m.params) == set(variables)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(m.params), _leaves(variables)))
    # export: weights only, marked inference-only, loads the same
    model_dirs.export(tmp_path / "run", tmp_path / "ship")
    shipped = model_dirs.load("any", tmp_path / "ship")
    assert shipped.info["inference_only"] and shipped.kind == "classifier"
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(shipped.params), _leaves(variables)))
    with pytest.raises(CfjaxError, match="already holds a model"):
        model_dirs.export(tmp_path / "run", tmp_path / "ship")


def test_load_refuses_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="'classifier' model, but a 'flow' model is needed"):
        model_dirs.load("flow", PRETRAINED_DIR / "mnist5k_classifier")
    config = ClassifierConfig(arch="mlp", hidden=8, depth=1)
    ckpt.write_model_info(tmp_path / "half", "classifier", config.to_dict(), status="training")
    with pytest.raises(CheckpointError, match="unfinished"):  # refused before any restore
        model_dirs.load("classifier", tmp_path / "half")
    ckpt.write_model_info(tmp_path / "gan", "gan", {}, status="complete")
    with pytest.raises(CheckpointError, match="cannot load"):
        model_dirs.load("any", tmp_path / "gan")
    ckpt.write_model_info(tmp_path / "wrong", "classifier", ClassifierConfig(arch="mlp", hidden=16, depth=1).to_dict(), status="complete")
    ckpt.save_checkpoint(tmp_path / "wrong", 1, init_classifier(jax.random.PRNGKey(0), config))
    with pytest.raises(CheckpointError, match="architecture"):
        model_dirs.load("classifier", tmp_path / "wrong")
