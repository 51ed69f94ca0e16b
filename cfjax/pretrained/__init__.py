"""Models shipped inside the package, so `cfjax demo` and `cfjax explain` need no training.

Each is a model directory ``<dataset>_<kind>/`` written by ``cfjax train <kind> --data <dataset>``
(see README.md for the exact commands and their metrics).
"""

from __future__ import annotations

from pathlib import Path

from cfjax.errors import CfjaxError

PRETRAINED_DIR = Path(__file__).resolve().parent


def default_model_dir(kind: str, dataset: str) -> Path:
    """The shipped model directory for (kind, dataset), or a CfjaxError saying how to train one."""
    path = PRETRAINED_DIR / f"{dataset}_{kind}"
    if not (path / "cfjax_model.json").exists():
        shipped = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "cfjax_model.json").exists())
        raise CfjaxError(
            f"no shipped {kind} model for dataset {dataset!r} (shipped: {', '.join(shipped) or 'none'}); "
            f"train one with `cfjax train {kind} --data {dataset} --out DIR` and pass --model DIR"
        )
    return path


def is_shipped_name(kind: str, name: str) -> bool:
    """Whether ``name`` (e.g. ``mnist5k``) names a shipped model of ``kind``."""
    return "/" not in str(name) and (PRETRAINED_DIR / f"{name}_{kind}" / "cfjax_model.json").exists()
