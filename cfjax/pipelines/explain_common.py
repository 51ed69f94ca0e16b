"""What `cfjax explain <method>` shares across methods: arguments, queries, targets, outputs.

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

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from cfjax.data import Dataset, available_datasets, load_dataset
from cfjax.errors import CfjaxError

REQUIRED_KEYS = ("x", "x_cf", "y", "y_pred", "y_target", "y_cf_pred")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="mnist5k", help=f"dataset name (default mnist5k, embedded; others via tfds: {', '.join(available_datasets()[2:])})")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets directory holding a prepared copy (never downloads)")


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the shipped model for --data)")
    add_data_arguments(p)
    p.add_argument("--split", default="test", help="dataset split to explain (default test)")
    p.add_argument("--limit", default="64", help="number of queries, or 'all' (default 64)")
    p.add_argument("--target", default="next", help="'next' = (predicted class + 1) mod C, or a class index K")
    p.add_argument("--out", required=True, help="output CF.npz")
    p.add_argument("--png", default=None, help="also write a picture grid: query | counterfactual | difference | heatmap")
    p.add_argument("--batch-size", type=int, default=256, help="queries per compiled batch (default 256)")
    p.add_argument("--seed", type=int, default=0)


def add_shard_arguments(p: argparse.ArgumentParser, default_shard_size: int = 1024) -> None:
    g = p.add_argument_group("dataset-scale runs (see cfjax.pipelines.shards)")
    g.add_argument("--shards", action="store_true", help="write --out as a directory of shards (shard-00000.npz ...) plus manifest.json, streaming the split chunk by chunk; implied when --out is an existing directory")
    g.add_argument("--shard-size", type=int, default=default_shard_size, help=f"queries per shard (default {default_shard_size})")
    g.add_argument("--resume", action="store_true", help="continue the shard directory --out: verify its finished shards and compute the rest (settings must match)")
    g.add_argument("--process-index", type=int, default=None, help="this process's index among --process-count writers of one shard directory (default: jax.process_index())")
    g.add_argument("--process-count", type=int, default=None, help="number of processes sharing the shard directory; process p computes shards k with k %% count == p (default: jax.process_count())")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host pods; untested in this repository)")


def wants_shards(args) -> bool:
    """Sharded output: --shards, or --out names an existing directory. --resume needs it."""
    sharded = bool(getattr(args, "shards", False)) or Path(args.out).is_dir()
    if getattr(args, "resume", False) and not sharded:
        raise CfjaxError(f"--resume continues a shard directory: pass --shards (and --out DIR), got --out {args.out}")
    return sharded


def process_layout(args) -> tuple[int, int]:
    """(process index, process count) for a sharded run; initialises jax.distributed on request."""
    import jax

    if getattr(args, "distributed", False):
        try:
            jax.distributed.initialize()
        except Exception as e:
            raise CfjaxError(f"--distributed: jax.distributed.initialize() failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    index = jax.process_index() if args.process_index is None else int(args.process_index)
    count = jax.process_count() if args.process_count is None else int(args.process_count)
    if count <= 0 or not 0 <= index < count:
        raise CfjaxError(f"--process-index {index} must lie in 0..{count - 1} (--process-count {count})")
    return index, count


def open_queries(args):
    """A SplitReader over --data/--split and the number of queries --limit asks for."""
    from cfjax.data import open_split

    reader = open_split(args.data, args.split, args.data_dir)
    limit = parse_limit(args.limit)
    return reader, len(reader) if limit is None else min(limit, len(reader))


def parse_limit(limit) -> int | None:
    if limit is None or str(limit).lower() == "all":
        return None
    try:
        n = int(limit)
    except ValueError:
        raise CfjaxError(f"--limit must be a positive integer or 'all', got {limit!r}") from None
    if n <= 0:
        raise CfjaxError(f"--limit must be positive, got {n}")
    return n


def load_queries(args) -> Dataset:
    ds = load_dataset(args.data, args.split, args.data_dir)
    return ds.take(parse_limit(args.limit))


def resolve_targets(spec, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``'next'`` -> (y_pred + 1) mod C; an integer K -> K for every query. int32 (N,)."""
    s = str(spec).strip().lower()
    if s == "next":
        return ((np.asarray(y_pred) + 1) % num_classes).astype(np.int32)
    try:
        k = int(s)
    except ValueError:
        raise CfjaxError(f"--target must be 'next' or a class index, got {spec!r}") from None
    if not 0 <= k < num_classes:
        raise CfjaxError(f"--target {k} is outside the model's classes 0..{num_classes - 1}")
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
    return path


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """Write an .npz through a temporary file and an atomic rename: no half-written file."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.npz", dir=path.parent or ".")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
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
