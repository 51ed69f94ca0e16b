import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfjax import checkpoint as ckpt
from cfjax.errors import CheckpointError


def _state(shape=(3, 4)):
    params = {"w": jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape), "b": [jnp.zeros(2), jnp.ones(2)]}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params)}


def test_round_trip_keeps_values_structure_and_meta(tmp_path):
    st = _state()
    ckpt.write_model_info(tmp_path, "flow", {"a": 1, "t": (1, 2)}, metrics={"acc": 0.5})
    ckpt.save_checkpoint(tmp_path, 7, st, {"epoch": 3})
    got, meta, step = ckpt.load_checkpoint(tmp_path, st)
    assert step == 7 and meta["epoch"] == 3
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(st)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(st)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    info = ckpt.read_model_info(tmp_path, "flow")
    assert info["config"] == {"a": 1, "t": [1, 2]} and info["metrics"]["acc"] == 0.5


def test_latest_step_and_max_to_keep(tmp_path):
    st = _state()
    for s in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, s, st)
    assert ckpt.latest_step(tmp_path) == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.read_model_info(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a cfjax model directory"):
        ckpt.read_model_info(tmp_path)
    with pytest.raises(CheckpointError, match="no saved checkpoint"):
        ckpt.load_checkpoint(tmp_path, _state())
    ckpt.write_model_info(tmp_path, "classifier", {})
    with pytest.raises(CheckpointError, match="'classifier' model"):
        ckpt.read_model_info(tmp_path, expected_kind="flow")


def test_corrupt_model_json(tmp_path):
    (tmp_path / ckpt.MODEL_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.read_model_info(tmp_path)


def test_architecture_mismatch_is_named(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _state((3, 4)))
    with pytest.raises(CheckpointError, match=r"architecture.*\(3, 4\)"):
        ckpt.load_checkpoint(tmp_path, _state((3, 5)))
    with pytest.raises(CheckpointError, match="architecture"):
        ckpt.load_checkpoint(tmp_path, {"params": {"w": jnp.zeros((3, 4))}})


def test_corrupt_array_files(tmp_path):
    st = _state()
    ckpt.save_checkpoint(tmp_path, 1, st)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "1" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or partial"):
        ckpt.load_checkpoint(tmp_path, st)


def test_partial_step_directory_is_ignored(tmp_path):
    """A step killed mid-write (Orbax temp dir) is never taken as the latest."""
    st = _state()
    ckpt.save_checkpoint(tmp_path, 1, st)
    tmp_step = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123"
    tmp_step.mkdir()
    (tmp_step / "junk").write_text("x")
    assert ckpt.latest_step(tmp_path) == 1
    _, _, step = ckpt.load_checkpoint(tmp_path, st)
    assert step == 1


def test_json_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "a.json"
    ckpt.write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        ckpt.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_json_and_figure_outputs_follow_the_umask(tmp_path):
    from cfjax.plotting import pyplot, save_figure

    old = os.umask(0o027)
    try:
        ckpt.write_json_atomic(tmp_path / "a.json", {"k": 1})
        save_figure(pyplot().figure(), tmp_path / "f.png")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(tmp_path / "f.png").st_mode & 0o777) == oct(0o640)


def test_load_weights_reads_only_the_named_items(tmp_path):
    """A saved optimizer state of any structure is skipped without being described."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    ckpt.save_checkpoint(tmp_path, 3, {"params": params, "opt_state": (jnp.ones(4), {"n": jnp.zeros((), jnp.int32)})})
    got = ckpt.load_weights(tmp_path, {"params": jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)})
    assert set(got) == {"params"}
    np.testing.assert_array_equal(got["params"]["w"], params["w"])
    with pytest.raises(CheckpointError, match=r"architecture \(no saved batch_stats\)"):
        ckpt.load_weights(tmp_path, {"params": params, "batch_stats": {}})
    with pytest.raises(CheckpointError, match="architecture"):
        ckpt.load_weights(tmp_path, {"params": {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}})


def test_renamed_settings_keys_read_under_their_current_name(tmp_path):
    (tmp_path / ckpt.MODEL_FILE).write_text(json.dumps({"kind": "duq", "config": {}, "synthesis": {"inversion": {"first_bn_multiplier": 7.0, "lr": 0.2}}}))
    info = ckpt.read_model_info(tmp_path)
    assert info["synthesis"]["inversion"] == {"first_bn_weight": 7.0, "lr": 0.2}
    assert ckpt.current_keys([{"bn_first_layer_weight": 1}, 2]) == [{"first_bn_weight": 1}, 2]
