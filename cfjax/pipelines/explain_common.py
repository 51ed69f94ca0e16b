"""What `cfjax explain <method>` shares across methods: queries, targets, outputs (the flags
themselves are declared in :mod:`cfjax.cli.common`).

The CF.npz contract (every method writes it; `cfjax evaluate` reads it):
    x          (N, H, W, C) float32 in [0, 1]   the queries
    x_cf       (N, H, W, C) float32 in [0, 1]   their counterfactuals
    y          (N,) int32                       true labels
    y_pred     (N,) int32                       the explained model's prediction on x
    y_target   (N,) int32                       the class asked for
    y_cf_pred  (N,) int32                       the explained model's prediction on x_cf
    heatmap    (N, H, W) float32                (ECINN) class-difference heatmap
    trajectory (S, N, H, W, C) float32          (DISC, progressive) one image per stage
optional:  p_pred (N,) probability of y_pred on x; p_cf (N,) probability of y_target on x_cf;
           method (str), model (str), seconds (float) wall time of the generation.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfjax.checkpoint import output_mode
from cfjax.data import Dataset, load_dataset
from cfjax.errors import CfjaxError
from cfjax.validation import class_range_problem

REQUIRED_KEYS = ("x", "x_cf", "y", "y_pred", "y_target", "y_cf_pred")


@dataclass(frozen=True)
class Queries:
    """What to explain: the model (a directory or a shipped name; None: the shipped model for
    ``data``), the dataset or .npz file, its split (None: test), how many queries (an int, its
    text, or 'all'/None) and the targets ('next', a class index, or a .npy of one per query)."""

    data: str = "mnist5k"
    data_dir: str | None = None
    split: str | None = None
    limit: int | str | None = 64
    target: str = "next"
    model: str | None = None


@dataclass(frozen=True)
class Output:
    """Where an explain run writes: one CF.npz (``out``, optional picture ``png``) or, with
    ``shards`` (or ``out`` an existing directory), a shard directory of ``shard_size`` queries a
    shard, continued with ``resume``, shared by ``process_count`` writers (see
    :mod:`cfjax.pipelines.shards`)."""

    out: str
    png: str | None = None
    shards: bool = False
    shard_size: int = 1024
    resume: bool = False
    process_index: int | None = None
    process_count: int | None = None
    distributed: bool = False
    coordinator_address: str | None = None


def wants_shards(output) -> bool:
    """Sharded output: --shards, or --out names an existing directory. --resume needs it."""
    sharded = bool(getattr(output, "shards", False)) or Path(output.out).is_dir()
    if getattr(output, "distributed", False) and not sharded:
        raise CfjaxError(f"--distributed processes share a shard directory: pass --shards (and --out DIR), got --out {output.out}")
    if getattr(output, "resume", False) and not sharded:
        raise CfjaxError(f"--resume continues a shard directory: pass --shards (and --out DIR), got --out {output.out}")
    return sharded


def process_layout(output) -> tuple[int, int]:
    """(process index, process count) for a sharded run; initialises jax.distributed on request."""
    import jax

    if getattr(output, "coordinator_address", None) and not getattr(output, "distributed", False):
        raise CfjaxError("--coordinator-address is for --distributed runs; add --distributed")
    if getattr(output, "distributed", False):
        try:
            if not jax.distributed.is_initialized():  # once per process (a library caller may have done it)
                jax.distributed.initialize(coordinator_address=getattr(output, "coordinator_address", None),
                                           num_processes=output.process_count, process_id=output.process_index)
        except Exception as e:
            raise CfjaxError(f"--distributed: jax.distributed.initialize() failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    index = jax.process_index() if output.process_index is None else int(output.process_index)
    count = jax.process_count() if output.process_count is None else int(output.process_count)
    if count <= 0 or not 0 <= index < count:
        raise CfjaxError(f"--process-index {index} must lie in 0..{count - 1} (--process-count {count})")
    return index, count


def is_data_file(data: str) -> bool:
    """--data names a file (an .npz path) rather than a dataset."""
    return str(data).lower().endswith(".npz") or os.sep in str(data)


def query_split(queries) -> str:
    """The split to explain: --split (default test); refused with a file --data (a file is one split)."""
    if is_data_file(queries.data):
        if getattr(queries, "split", None) is not None:
            raise CfjaxError(f"--split {queries.split}: a file --data {queries.data} is one split; leave --split out")
        return "file"
    return queries.split or "test"


def resolve_model_dir(queries, kind: str) -> Path:
    """--model as a directory or a shipped model's name; without it, the shipped model for --data."""
    from cfjax.pretrained import default_model_dir, is_shipped_name

    if queries.model:
        if not Path(queries.model).exists() and is_shipped_name(kind, queries.model):
            return default_model_dir(kind, queries.model)
        return Path(queries.model)
    if is_data_file(queries.data):
        raise CfjaxError(f"--data {queries.data} is a file: say which model explains it with --model (a directory or a shipped name such as mnist5k)")
    return default_model_dir(kind, queries.data)


def target_file(spec) -> np.ndarray | None:
    """The per-query targets of a --target .npy file (validated later against the model), or None."""
    s = str(spec)
    if not s.lower().endswith(".npy"):
        return None
    path = Path(s)
    if not path.is_file():
        raise CfjaxError(f"--target {s}: file does not exist")
    try:
        t = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CfjaxError(f"--target {s} is not a readable .npy ({type(e).__name__}: {e})") from None
    if t.ndim != 1:
        raise CfjaxError(f"--target {s} must hold one class index per query (shape (N,)), got shape {t.shape}")
    if not (np.issubdtype(t.dtype, np.integer) or (np.issubdtype(t.dtype, np.floating) and np.all(np.isfinite(t)) and np.all(t == np.round(t)))):
        raise CfjaxError(f"--target {s} must hold integer class indices, got dtype {t.dtype}")
    return t.astype(np.int64)


def target_header(spec) -> str:
    """How a run records --target: the spec, or for a file its name and SHA-256."""
    if target_file(spec) is None:
        return str(spec)
    import hashlib

    return f"{spec} sha256:{hashlib.sha256(Path(spec).read_bytes()).hexdigest()}"


def targets_for(spec, n: int, num_classes: int):
    """--target as explain_arrays takes it: 'next', an int, or (n,) validated class indices."""
    t = target_file(spec)
    if t is None:
        resolve_targets(spec, np.zeros(1, np.int32), num_classes)
        return str(spec)
    if len(t) != n:
        raise CfjaxError(f"--target {spec} holds {len(t)} targets but there are {n} queries (after --limit)")
    problem = class_range_problem(t, num_classes)
    if problem:
        raise CfjaxError(f"--target {spec}: {problem}")
    return t.astype(np.int32)


def check_target_spec(spec) -> None:
    """Refuse a target that is neither 'next', an integer nor a .npy file name (the class range
    needs the model and is checked against it later)."""
    if not str(spec).lower().endswith(".npy"):
        resolve_targets(spec, np.zeros(1, np.int32), 1 << 30)


def open_queries(queries):
    """A SplitReader over --data/--split and the number of queries --limit asks for."""
    from cfjax.data import open_split, reader_from_arrays

    split = query_split(queries)
    if split == "file":
        reader = reader_from_arrays(load_dataset_file(queries.data))
    else:
        reader = open_split(queries.data, split, queries.data_dir)
    limit = parse_limit(queries.limit)
    return reader, len(reader) if limit is None else min(limit, len(reader))


def parse_limit(limit) -> int | None:
    if limit is None or str(limit).lower() == "all":
        return None
    try:
        n = int(limit)
    except ValueError:
        n = None
    if n is None or n <= 0:
        raise CfjaxError(f"limit must be a positive integer or 'all', got {limit!r}")
    return n


def load_dataset_file(path) -> Dataset:
    from cfjax.data import load_npz_dataset

    return load_npz_dataset(path)


def load_queries(queries) -> Dataset:
    split = query_split(queries)
    limit = parse_limit(queries.limit)  # before the (slower) load
    ds = load_dataset_file(queries.data) if split == "file" else load_dataset(queries.data, split, queries.data_dir)
    return ds.take(limit)


def resolve_targets(spec, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``'next'`` -> (y_pred + 1) mod C; an integer K -> K for every query. int32 (N,)."""
    s = str(spec).strip().lower()
    if s == "next":
        return ((np.asarray(y_pred) + 1) % num_classes).astype(np.int32)
    try:
        k = int(s)
    except ValueError:
        raise CfjaxError(f"target must be 'next' or a class index, got {spec!r}") from None
    problem = class_range_problem(np.asarray([k]), num_classes)
    if problem:
        raise CfjaxError(f"target {problem}")
    return np.full(np.shape(y_pred), k, np.int32)


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Fail early (before any work) when ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise CfjaxError(f"{what} {path} is a directory, expected a file path")
    if not parent.exists():
        raise CfjaxError(f"{what} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise CfjaxError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise CfjaxError(f"{what} {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise CfjaxError(f"{what} {path} exists and is not writable")
    return path


PICTURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_picture(path, out=None, what: str = "--png") -> Path:
    """A picture path that can be written, with a supported suffix, not the same file as --out."""
    p = check_writable(path, what)
    if p.suffix.lower() not in PICTURE_SUFFIXES:
        raise CfjaxError(f"{what} {path}: unsupported picture type {p.suffix or '(none)'}; use one of {', '.join(PICTURE_SUFFIXES)}")
    if out is not None and Path(out).resolve() == p.resolve():
        raise CfjaxError(f"{what} {path} is the same file as --out; choose another name")
    return p


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """Write an .npz through a temporary file and an atomic rename: no half-written file."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent or ".")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.chmod(tmp, output_mode())  # mkstemp makes 0600; outputs follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_cf_npz(path: str | os.PathLike) -> dict:
    """Read a CF.npz and check the contract: keys, shapes, dtypes. CfjaxError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise CfjaxError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise CfjaxError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CfjaxError(f"{path} is missing key(s) {', '.join(missing)} of the CF.npz contract")
    n = data["x"].shape[0] if data["x"].ndim == 4 else -1
    if data["x"].ndim != 4 or data["x_cf"].shape != data["x"].shape:
        raise CfjaxError(f"{path}: x and x_cf must both be (N, H, W, C), got {data['x'].shape} and {data['x_cf'].shape}")
    for k in REQUIRED_KEYS[2:]:
        if data[k].shape != (n,):
            raise CfjaxError(f"{path}: {k} must have shape ({n},), got {data[k].shape}")
    return data
