"""Model directories: Orbax checkpoints of a state pytree plus the config that rebuilds the model.

Layout of a model directory::

    DIR/cfjax_model.json          kind, config, dataset, metrics: enough to rebuild the model
    DIR/checkpoints/<step>/state  Orbax StandardCheckpoint of the state pytree
                                  (params, optimizer state, statistics, ...)
    DIR/checkpoints/<step>/meta   JSON: step, epoch, rng seed, anything the trainer needs to resume

Writes are atomic: Orbax writes each step into a temporary directory and renames it when the
write is complete, and ``cfjax_model.json`` is written to a temporary file then ``os.replace``d.
A killed run therefore leaves the previous complete step in place; a partial step directory is
never picked as "latest". Every problem reading a directory is a :class:`CheckpointError` whose
message names the directory and what is wrong.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cfjax.errors import CfjaxError, CheckpointError

MODEL_FILE = "cfjax_model.json"
CKPT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1

# Orbax logs every save at INFO/WARNING through absl; keep the CLI quiet.
logging.getLogger("absl").setLevel(logging.ERROR)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _manager(model_dir: Path, max_to_keep: int | None = 2, read_only: bool = False):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        (model_dir / CKPT_SUBDIR).absolute(),
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def output_mode() -> int:
    """The mode a new file gets under the user's umask (``tempfile.mkstemp`` makes 0600; the
    atomic writers chmod their temporary file to this before the rename)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_model_info(model_dir, kind: str, config: dict, **extra) -> None:
    """Write ``cfjax_model.json`` (kind, config and any extra JSON-safe fields) atomically."""
    info = {"format": FORMAT_VERSION, "kind": kind, "config": config, **extra}
    write_json_atomic(Path(model_dir) / MODEL_FILE, info)


# Settings keys renamed since files were first written: old name -> the name in use. Files keep
# what they were written with; readers see the current names (so --resume of an older run works).
RENAMED_KEYS = {"bn_first_layer_weight": "first_bn_weight", "first_bn_multiplier": "first_bn_weight"}


def current_keys(obj):
    """``obj`` (JSON data) with every dict key of :data:`RENAMED_KEYS` under its current name."""
    if isinstance(obj, dict):
        return {RENAMED_KEYS.get(k, k): current_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [current_keys(v) for v in obj]
    return obj


def read_model_info(model_dir, expected_kind: str | None = None) -> dict:
    """Read ``cfjax_model.json``; CheckpointError if the directory is missing, foreign or corrupt."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"model path {model_dir} is not a directory")
    path = model_dir / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"{model_dir} is not a cfjax model directory (no {MODEL_FILE})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e})") from e
    if not isinstance(info, dict) or "kind" not in info or "config" not in info:
        raise CheckpointError(f"{path} is corrupt (missing 'kind' or 'config')")
    if expected_kind is not None and info["kind"] != expected_kind:
        raise CheckpointError(
            f"{model_dir} holds a {info['kind']!r} model, but a {expected_kind!r} model is needed here"
        )
    return current_keys(info)


def save_checkpoint(model_dir, step: int, state: Any, meta: dict | None = None, max_to_keep: int | None = 2) -> None:
    """Save ``state`` (a pytree of arrays) and ``meta`` (JSON dict) as step ``step``, atomically."""
    ocp = _ocp()
    model_dir = Path(model_dir)
    meta = dict(meta or {}, step=int(step))
    meta = json.loads(json.dumps(meta, default=_json_default))
    state = jax.device_get(state)
    with _manager(model_dir, max_to_keep) as mngr:
        if int(step) in mngr.all_steps():
            # Re-saving a step (e.g. the post-training pass of a resumed run): the previous
            # step is still kept (max_to_keep >= 2), so a crash here loses no training.
            mngr.delete(int(step))
        mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()


def latest_step(model_dir) -> int | None:
    """The newest complete step in ``model_dir`` (None when there is none)."""
    ckpt = Path(model_dir) / CKPT_SUBDIR
    if not ckpt.is_dir():
        return None
    with _manager(Path(model_dir), read_only=True) as mngr:
        return mngr.latest_step()


def load_checkpoint(model_dir, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restore (state, meta, step) from ``model_dir`` into the structure of ``target``.

    ``target`` is a pytree with the expected structure, shapes and dtypes (concrete arrays or
    ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape`` of the model's init). A checkpoint of
    another architecture, a partial or corrupt one, or none at all raises CheckpointError.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CKPT_SUBDIR).is_dir():
        raise CheckpointError(f"{model_dir} has no saved checkpoint (no {CKPT_SUBDIR}/ directory)")
    with _manager(model_dir, read_only=True) as mngr:
        if step is None:
            step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{model_dir} has no complete checkpoint step (a run killed before its first save?)")
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), getattr(a, "dtype", np.asarray(a).dtype)), target
        )
        _check_structure(model_dir, mngr, step, abstract)
        restored = _restore(model_dir, mngr, step, abstract)
    return restored["state"], dict(restored["meta"] or {}), int(step)


def load_weights(model_dir, target: dict, step: int | None = None) -> dict:
    """Restore only the top-level items of ``target`` (e.g. ``params``, ``batch_stats``) from
    ``model_dir``'s newest step (or ``step``).

    Other items saved beside them (an optimiser state) are read by their saved shapes and
    dropped, so loading a training run needs no optimiser; an exported directory holds only the
    weights. CheckpointError as :func:`load_checkpoint`, and when an item of ``target`` was not
    saved.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CKPT_SUBDIR).is_dir():
        raise CheckpointError(f"{model_dir} has no saved checkpoint (no {CKPT_SUBDIR}/ directory)")
    with _manager(model_dir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{model_dir} has no complete checkpoint step (a run killed before its first save?)")
        saved = _saved_metadata(model_dir, mngr, step)
        try:
            names = list(saved.keys())
        except Exception:  # noqa: BLE001 - not a dict of items: no model state of ours
            names = []
        missing = [k for k in target if k not in names]
        if missing:
            raise CheckpointError(f"checkpoint {model_dir} does not match this model's architecture (no saved {', '.join(missing)})")
        abstract = {k: jax.tree_util.tree_map(_abstract, target[k] if k in target else saved[k]) for k in names}
        _check_structure(model_dir, mngr, step, abstract)
        restored = _restore(model_dir, mngr, step, abstract)
    return {k: restored["state"][k] for k in target}


def _corrupt(model_dir: Path, step: int, why: BaseException | str) -> CheckpointError:
    """The one error for a checkpoint step that cannot be read (first line of the cause)."""
    if isinstance(why, BaseException):
        why = (str(why).strip().splitlines() or [type(why).__name__])[0][:300]
    return CheckpointError(f"checkpoint {model_dir} step {step} is corrupt or partial: {why}")


def _restore(model_dir: Path, mngr, step: int, abstract: Any) -> dict:
    """{"state", "meta"} of ``step`` restored into ``abstract``; CheckpointError when unreadable."""
    ocp = _ocp()
    try:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise _corrupt(model_dir, step, e) from e


def _abstract(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(a) if not hasattr(a, "shape") else tuple(a.shape),
                                getattr(a, "dtype", None) or np.asarray(a).dtype)


def _saved_metadata(model_dir: Path, mngr, step: int):
    """The saved state tree's metadata (shapes, dtypes) of ``step``; CheckpointError when unreadable."""
    try:
        saved = mngr.item_metadata(step)["state"]
    except Exception as e:
        raise _corrupt(model_dir, step, e) from e
    if saved is None:
        raise _corrupt(model_dir, step, "no state metadata")
    return saved


def _check_structure(model_dir: Path, mngr, step: int, abstract: Any) -> None:
    """Compare the saved tree's shapes with the expected ones, to name an architecture mismatch."""
    saved = _saved_metadata(model_dir, mngr, step)
    exp = jax.tree_util.tree_leaves_with_path(abstract)
    try:
        got = jax.tree_util.tree_leaves(saved)
    except Exception:  # unusual metadata objects: let the restore itself decide
        return
    # Orbax stores namedtuples as sequences, so key paths differ; leaf order does not.
    if len(got) != len(exp):
        raise CheckpointError(
            f"checkpoint {model_dir} does not match this model's architecture "
            f"({len(got)} saved arrays, {len(exp)} expected)"
        )
    for (path, want), have in zip(exp, got):
        shape = getattr(have, "shape", None)
        if shape is not None and tuple(shape) != tuple(want.shape):
            raise CheckpointError(
                f"checkpoint {model_dir} does not match this model's architecture: "
                f"{jax.tree_util.keystr(path)} has shape {tuple(shape)}, expected {tuple(want.shape)}"
            )


def check_export_target(dst) -> Path:
    """``dst`` as a Path; CfjaxError when it already holds a model (an export never overwrites)."""
    dst = Path(dst)
    if (dst / MODEL_FILE).exists() or (dst / CKPT_SUBDIR).exists():
        raise CfjaxError(f"export target {dst} already holds a model; remove it first or choose another path", argument="export")
    return dst


def export_inference_model(src, dst, kind: str, config: dict, state: Any, info: dict) -> Path:
    """Write a trained model's ``state`` (weights only, no optimizer state) from model directory
    ``src`` into a new model directory ``dst``, with ``src``'s info marked ``inference_only``."""
    dst = check_export_target(dst)
    extra = {k: v for k, v in info.items() if k not in ("format", "kind", "config")}
    step = int(info.get("train_settings", {}).get("steps", 0))
    save_checkpoint(dst, step, state, {"exported_from": str(src)}, max_to_keep=1)
    write_model_info(dst, kind, config, **{**extra, "inference_only": True})
    return dst
