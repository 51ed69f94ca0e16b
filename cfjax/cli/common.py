"""Every flag more than one command shares, declared once, with its argparse type.

A type here parses the text and applies the same rule as :mod:`cfjax.validation`, so a bad value
ends as argparse's one line naming the flag (``--batch-size must be a positive integer, got
'0'``) before any work. Defaults come from the config dataclasses and presets of the library
(:func:`default`), never restated here.
"""

from __future__ import annotations

import argparse
import dataclasses

from cfjax.errors import CfjaxError
from cfjax.validation import describe_number, number_problem


# --------------------------------------------------------------------------------------------
# argparse types


def number(integer: bool, minimum: float | None = None, strict: bool = False):
    """An argparse ``type``: text -> int/float obeying :func:`cfjax.validation.number_problem`."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe_number(integer, minimum, strict)}, got {text!r}") from None
        rule = number_problem(value, integer, minimum, strict)
        if rule is not None:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = describe_number(integer, minimum, strict)  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(True, 0, strict=True)
NON_NEGATIVE_INT = number(True, 0)
POSITIVE_FLOAT = number(False, 0, strict=True)
NON_NEGATIVE_FLOAT = number(False, 0)
FINITE_FLOAT = number(False)


def checked(check, name: str):
    """An argparse ``type`` that keeps the text and refuses what ``check(text)`` refuses (CfjaxError)."""

    def parse(text: str):
        try:
            check(text)
        except CfjaxError as e:  # "limit must be ..." reads "--limit must be ..." (cfjax.cli._Parser)
            msg = str(e)
            raise argparse.ArgumentTypeError(msg[len(name) + 1:] if msg.startswith(f"{name} must be ") else msg) from None
        return text

    parse.__name__ = name
    return parse


def _check_residual(text: str) -> None:
    from cfjax.methods.ecinn import check_residual

    check_residual(text)


# ECINN's --residual (explain, demo): a number in [0, 1], kept as text; the pipelines convert it
RESIDUAL = checked(_check_residual, "residual")


def default(cls, name: str):
    """The default of field ``name`` of the dataclass ``cls``: the one home of that default."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{cls.__name__} has no field {name!r}")


# --------------------------------------------------------------------------------------------
# shared flags


def add_data(p: argparse.ArgumentParser) -> None:
    from cfjax.data import available_datasets

    p.add_argument("--data", default="mnist5k", help=f"dataset name (default mnist5k, embedded; others via tfds: {', '.join(available_datasets()[2:])}) or a .npz file with x (N, H, W, C) uint8/[0, 1] floats and optional y")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets directory holding a prepared copy, or a folder of the four MNIST-style IDX files (never downloads)")


def add_seed(p, help: str = "random seed (default 0)") -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_batch_size(p, default: int | None, help: str) -> None:
    p.add_argument("--batch-size", type=POSITIVE_INT, default=default, help=help)


def add_devices(p) -> None:
    p.add_argument("--devices", type=NON_NEGATIVE_INT, default=0, help="local devices to shard the batch over (default 0 = all)")


def _check_limit(text: str) -> None:
    from cfjax.pipelines.explain_common import parse_limit

    parse_limit(text)


def _check_target(text: str) -> None:
    from cfjax.pipelines.explain_common import check_target_spec

    check_target_spec(text)


def add_explain(p: argparse.ArgumentParser, batch_size: int = 256) -> None:
    """The flags of every ``cfjax explain`` method: model, queries, targets, outputs."""
    p.add_argument("--model", default=None, help="model directory or the name of a shipped model (mnist5k, fakemnist5k); default: the shipped model for --data")
    add_data(p)
    p.add_argument("--split", default=None, help="dataset split to explain (default test; not with a file --data)")
    p.add_argument("--limit", type=checked(_check_limit, "limit"), default="64", help="number of queries, or 'all' (default 64)")
    p.add_argument("--target", type=checked(_check_target, "target"), default="next", help="'next' = (predicted class + 1) mod C, a class index K, or a .npy of one class index per query (file order, after --limit)")
    p.add_argument("--out", required=True, help="output CF.npz")
    p.add_argument("--png", default=None, help="also write a picture grid: query | counterfactual | difference | heatmap")
    add_batch_size(p, batch_size, f"queries per compiled batch (default {batch_size})")
    add_seed(p, "random seed (default 0; ECINN is deterministic and ignores it)")
    add_devices(p)
    add_quiet(p)


def add_shards(p: argparse.ArgumentParser, default_shard_size: int) -> None:
    g = p.add_argument_group("dataset-scale runs (see cfjax.pipelines.shards)")
    g.add_argument("--shards", action="store_true", help="write --out as a directory of shards (shard-00000.npz ...) plus manifest.json, streaming the split chunk by chunk; implied when --out is an existing directory")
    g.add_argument("--shard-size", type=POSITIVE_INT, default=default_shard_size, help=f"queries per shard (default {default_shard_size})")
    g.add_argument("--resume", action="store_true", help="continue the shard directory --out: verify its finished shards and compute the rest (settings must match)")
    g.add_argument("--process-index", type=NON_NEGATIVE_INT, default=None, help="this process's index among --process-count writers of one shard directory (default: jax.process_index())")
    g.add_argument("--process-count", type=POSITIVE_INT, default=None, help="number of processes sharing the shard directory; process p computes shards k with k %% count == p (default: jax.process_count())")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host pods)")
    g.add_argument("--coordinator-address", default=None, help="--distributed: host:port of process 0's coordinator (default: found by jax.distributed)")


def queries_from(args):
    """The :class:`~cfjax.pipelines.explain_common.Queries` the explain flags name."""
    from cfjax.pipelines.explain_common import Queries

    return Queries(data=args.data, data_dir=args.data_dir, split=args.split, limit=args.limit, target=args.target, model=args.model)


def output_from(args):
    """The :class:`~cfjax.pipelines.explain_common.Output` the explain flags name."""
    from cfjax.pipelines.explain_common import Output

    return Output(out=args.out, png=args.png, shards=args.shards, shard_size=args.shard_size, resume=args.resume,
                  process_index=args.process_index, process_count=args.process_count, distributed=args.distributed,
                  coordinator_address=args.coordinator_address)


def add_training(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """The flags of every ``cfjax train`` command: data, output directory, resume, export."""
    add_data(p)
    p.add_argument("--out", required=True, help="model directory to write (refuses to overwrite; see --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=checkpoint_every, help=f"steps between checkpoints (default {checkpoint_every})")
    p.add_argument("--export", default=None, help="also write an inference-only copy (no optimizer state) here")
    add_quiet(p)
