"""Dataset-scale runs: results as shards plus a manifest, resumable after a kill.

A shard directory ``DIR`` holds

    DIR/shard-00000.npz ...   one CF.npz each (the contract of cfjax.pipelines.explain_common)
                              for queries [start, stop) of the split, plus ``query_index`` (n,)
    DIR/manifest.json         what was asked (method, model, data, split, settings), the shard
                              plan, and for every finished shard its range, byte size and sha256

Every file is written atomically (temporary file + rename): the shard first, then the manifest
that records it. A run killed at any moment therefore leaves finished shards that the manifest
vouches for, at most one unrecorded shard (redone on resume) and perhaps a temporary file
(removed on resume). ``--resume`` refuses a directory made with other settings, re-verifies the
recorded shards (size and sha256; a damaged one is recomputed) and computes only the rest.

Several processes (hosts of a pod after ``jax.distributed.initialize()``) share one directory:
process p of P computes the shards k with k % P == p and records them in its own
``manifest-p0000p-of-0000P.json``; readers merge the manifests. One process writes
``manifest.json``.

Determinism: a shard's arrays depend only on the query indices and the settings the manifest
pins (batch size, shard size, devices, seed, ...), never on what ran before in the process, so a
killed and resumed run writes byte-identical arrays to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cfjax.checkpoint import current_keys
from cfjax.errors import CfjaxError

FORMAT = "cfjax-shards/1"
MANIFEST = "manifest.json"
KILL_HOOK = "CFJAX_TEST_KILL"  # "<k>:written" or "<k>:recorded": SIGKILL self after the k-th shard (tests)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    if process_count == 1:
        return MANIFEST
    return f"manifest-p{process_index:05d}-of-{process_count:05d}.json"


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every shard of ``n`` queries."""
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise CfjaxError(f"--shard-size must be a positive integer, got {shard_size!r}")
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    from cfjax.checkpoint import write_json_atomic

    write_json_atomic(path, obj)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CfjaxError(f"{path} is not a readable manifest ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CfjaxError(f"{path} is not a cfjax shard manifest (format {obj.get('format') if isinstance(obj, dict) else None!r}, expected {FORMAT!r})")
    return current_keys(obj)


def _manifest_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("manifest*.json") if p.name == MANIFEST or p.name.startswith("manifest-p"))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: directory has {va!r}, command asks {vb!r}")
    return out


def _check_entry(out_dir: Path, e: dict) -> str | None:
    """None when the shard file matches its manifest entry, else why not."""
    path = out_dir / e["file"]
    if not path.exists():
        return "missing"
    if path.stat().st_size != e["bytes"]:
        return f"size {path.stat().st_size} bytes, manifest says {e['bytes']}"
    if sha256_file(path) != e["sha256"]:
        return "sha256 differs from the manifest"
    return None


@dataclass
class ShardRun:
    """One process's view of a shard directory being written."""

    out_dir: Path
    header: dict                      # everything that must match on --resume
    ranges: list                      # [(start, stop)] of every shard of the plan
    process_index: int = 0
    process_count: int = 1
    done: dict = field(default_factory=dict)  # shard index -> manifest entry
    seconds: float = 0.0              # generation time recorded so far (all sessions)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / manifest_name(self.process_index, self.process_count)

    @property
    def mine(self) -> list[int]:
        return [k for k in range(len(self.ranges)) if k % self.process_count == self.process_index]

    def write_manifest(self) -> None:
        mine = self.mine
        _write_json_atomic(self.manifest_path, {
            **self.header,
            "num_shards": len(self.ranges),
            "process_index": self.process_index,
            "process_count": self.process_count,
            "assigned": mine,
            "shards": [self.done[k] for k in sorted(self.done)],
            "seconds": self.seconds,
            "completed": all(k in self.done for k in mine),
        })


def open_run(out_dir, header: dict, n: int, shard_size: int, resume: bool,
             process_index: int = 0, process_count: int = 1, log: Callable[[str], None] = print) -> ShardRun:
    """Create ``out_dir`` (or, with ``resume``, reopen it) for a sharded run of ``n`` queries.

    ``header`` holds method, model, data, split and settings: on resume it must equal the
    directory's. Refuses to write into a non-empty directory without ``resume``.
    """
    out_dir = Path(out_dir)
    if not 0 <= process_index < process_count:
        raise CfjaxError(f"process index {process_index} is outside 0..{process_count - 1}")
    ranges = plan_shards(n, shard_size)
    header = {"format": FORMAT, **header, "num_queries": int(n), "shard_size": int(shard_size)}
    header = json.loads(json.dumps(header))  # the JSON form, so comparisons match what is read back
    run = ShardRun(out_dir, header, ranges, process_index, process_count)
    if out_dir.exists() and not out_dir.is_dir():
        raise CfjaxError(f"--out {out_dir} is a file; sharded output needs a directory")
    if not out_dir.exists():
        if not out_dir.parent.exists():
            raise CfjaxError(f"--out {out_dir}: directory {out_dir.parent} does not exist")
        out_dir.mkdir(exist_ok=process_count > 1)  # the processes of one run start together
    elif any(out_dir.iterdir()):
        if process_count > 1 and not resume:
            _join(run)
        elif not resume:
            raise CfjaxError(f"--out {out_dir} is not empty: pass --resume to continue that run, or choose a new directory (nothing is overwritten)")
        else:
            _reopen(run, log)
    elif resume:
        log(f"{out_dir} is empty: nothing to resume, starting")
    if not os.access(out_dir, os.W_OK):
        raise CfjaxError(f"--out {out_dir} is not writable")
    run.write_manifest()
    return run


def _reopen(run: ShardRun, log) -> None:
    out_dir = run.out_dir
    manifests = _manifest_files(out_dir)
    if not manifests:
        raise CfjaxError(f"--resume: {out_dir} is not empty but holds no {MANIFEST}; not a cfjax shard directory")
    for path in manifests:
        old = _read_json(path)
        theirs = {k: old.get(k) for k in run.header}
        diff = _differences(theirs, run.header)
        if diff:
            raise CfjaxError(f"--resume: {path} was written with other settings: " + "; ".join(diff))
        if old.get("process_count", 1) != run.process_count:
            raise CfjaxError(f"--resume: {path} was written by {old.get('process_count')} process(es), this run has {run.process_count}")
    own = run.manifest_path
    if own.exists():
        old = _read_json(own)
        run.seconds = float(old.get("seconds", 0.0))
        for e in old.get("shards", []):
            why = _check_entry(out_dir, e)
            if why is None and tuple(run.ranges[e["index"]]) == (e["start"], e["stop"]):
                run.done[e["index"]] = e
            else:
                log(f"{e['file']}: {why or 'range differs from the plan'}; recomputing it")
    own_names = {shard_name(k) for k in run.mine} | {run.manifest_path.name}
    for tmp in out_dir.glob("*.tmp*"):  # a write of this process cut off by the kill
        if tmp.name.split(".", 2)[0] + "." + tmp.name.split(".", 2)[1] in own_names:
            tmp.unlink()
    left = len([k for k in run.mine if k not in run.done])
    log(f"resuming {out_dir}: {len(run.done)} shard(s) verified, {left} to compute")


def _join(run: ShardRun) -> None:
    """A fresh run of several processes started together: the others' files may already be there.
    Refused when this process's own manifest or shards exist (that is a --resume), or when another
    process's manifest was written with other settings or another process count."""
    own = [p for p in [run.manifest_path, *(run.out_dir / shard_name(k) for k in run.mine)] if p.exists()]
    if own:
        raise CfjaxError(f"--out {run.out_dir} already holds this process's {own[0].name}: pass --resume to continue that run, "
                         "or choose a new directory (nothing is overwritten)")
    foreign = [p.name for p in run.out_dir.iterdir() if not (p.name == MANIFEST or p.name.startswith(("manifest-p", "shard-")) or ".tmp" in p.name)]
    if foreign:
        raise CfjaxError(f"--out {run.out_dir} is not empty and holds {foreign[0]}, which no process of a shard run writes: "
                         "choose a new directory (nothing is overwritten)")
    for path in _manifest_files(run.out_dir):
        old = _read_json(path)
        diff = _differences({k: old.get(k) for k in run.header}, run.header)
        if diff:
            raise CfjaxError(f"--out {run.out_dir}: {path.name} was written with other settings: " + "; ".join(diff))
        if old.get("process_count", 1) != run.process_count:
            raise CfjaxError(f"--out {run.out_dir}: {path.name} was written by {old.get('process_count')} process(es), this run has {run.process_count}")


def _kill_hook(k_done: int, when: str) -> None:
    spec = os.environ.get(KILL_HOOK)
    if spec:
        k, w = spec.split(":")
        if int(k) == k_done and w == when:
            os.kill(os.getpid(), signal.SIGKILL)


def run_shards(run: ShardRun, compute: Callable[[int, int, Callable[[int], None]], dict],
               description: str, quiet: bool = False, summary: Callable[[dict], dict] | None = None) -> ShardRun:
    """Compute every unfinished shard of this process: ``compute(start, stop, advance) -> arrays``.

    ``advance(m)`` moves the progress bar by m queries. Each shard's arrays are written
    atomically, then recorded in the manifest with their size, sha256, seconds and ``summary``.
    """
    from cfjax.pipelines.explain_common import save_npz_atomic
    from cfjax.pipelines.progress import progress_bar

    mine = run.mine
    total = sum(run.ranges[k][1] - run.ranges[k][0] for k in mine)
    already = sum(run.ranges[k][1] - run.ranges[k][0] for k in mine if k in run.done)
    todo = [k for k in mine if k not in run.done]
    with progress_bar(total, description, disable=quiet) as bar:
        if already:
            bar.advance(already)
        state = {"done": already}
        for i, k in enumerate(todo):
            start, stop = run.ranges[k]

            def advance(m: int, k=k) -> None:
                state["done"] += int(m)
                bar.update(state["done"], shard=f"{k + 1}/{len(run.ranges)}")

            t0 = time.perf_counter()
            arrays = compute(start, stop, advance)
            seconds = time.perf_counter() - t0
            arrays["query_index"] = np.arange(start, stop, dtype=np.int64)
            arrays["seconds"] = np.float32(seconds)
            path = run.out_dir / shard_name(k)
            save_npz_atomic(path, **arrays)
            _kill_hook(len(run.done) + 1, "written")
            entry = {"index": k, "file": path.name, "start": start, "stop": stop, "n": stop - start,
                     "bytes": path.stat().st_size, "sha256": sha256_file(path), "seconds": round(seconds, 4)}
            if summary is not None:
                entry.update(summary(arrays))
            run.done[k] = entry
            run.seconds += seconds
            run.write_manifest()
            _kill_hook(len(run.done), "recorded")
            state["done"] = sum(run.ranges[j][1] - run.ranges[j][0] for j in mine if j in run.done)
            bar.update(state["done"], shard=f"{k + 1}/{len(run.ranges)}")
    return run


# ----------------------------------------------------------------------------------------------
# reading


def is_shard_dir(path) -> bool:
    p = Path(path)
    return (p.is_dir() and bool(_manifest_files(p))) or (p.is_file() and p.name.startswith("manifest") and p.suffix == ".json")


@dataclass(frozen=True)
class ShardSet:
    """A finished (or partial) shard directory: the merged manifests."""

    out_dir: Path
    header: dict
    entries: list        # manifest entries of the finished shards, in query order
    num_shards: int
    seconds: float

    @property
    def complete(self) -> bool:
        return len(self.entries) == self.num_shards

    @property
    def num_done(self) -> int:
        return sum(e["n"] for e in self.entries)


def open_shards(path, verify: bool = True) -> ShardSet:
    """Read a shard directory (or its manifest.json); ``verify`` re-checks sizes and sha256."""
    p = Path(path)
    out_dir = p.parent if p.is_file() else p
    if not out_dir.exists():
        raise CfjaxError(f"{path} does not exist")
    manifests = _manifest_files(out_dir)
    if not manifests:
        raise CfjaxError(f"{out_dir} holds no {MANIFEST}: not a cfjax shard directory")
    header, entries, num_shards, seconds = None, {}, None, 0.0
    for mp in manifests:
        m = _read_json(mp)
        h = {k: v for k, v in m.items() if k not in ("shards", "seconds", "completed", "process_index", "assigned")}
        if header is None:
            header = h
        elif _differences(header, h):
            raise CfjaxError(f"{mp} disagrees with {manifests[0].name}: " + "; ".join(_differences(header, h)))
        num_shards = int(m["num_shards"])
        seconds += float(m.get("seconds", 0.0))
        for e in m.get("shards", []):
            entries[e["index"]] = e
    if verify:
        for e in entries.values():
            why = _check_entry(out_dir, e)
            if why is not None:
                raise CfjaxError(f"{out_dir / e['file']}: {why} (run the explain command again with --resume to recompute it)")
    return ShardSet(out_dir, header, [entries[k] for k in sorted(entries)], num_shards, seconds)


def iter_shards(shards: ShardSet, require_complete: bool = True) -> Iterator[dict]:
    """Each finished shard as a checked CF.npz dict, one at a time, in query order."""
    from cfjax.pipelines.explain_common import load_cf_npz

    if require_complete and not shards.complete:
        missing = sorted(set(range(shards.num_shards)) - {e["index"] for e in shards.entries})
        raise CfjaxError(f"{shards.out_dir} is incomplete: {len(missing)} of {shards.num_shards} shard(s) not finished "
                         f"(first missing: {shard_name(missing[0])}); finish it with the same explain command and --resume")
    for e in shards.entries:
        yield load_cf_npz(shards.out_dir / e["file"])


def load_shards(path, require_complete: bool = True) -> dict:
    """All shards concatenated into one CF.npz-like dict (holds everything in memory).

    ``trajectory``/``stage_success`` (DISC, (S, n, ...)) are joined along their query axis 1;
    scalars (method, model) come from the first shard; ``seconds`` is the recorded total.
    """
    s = open_shards(path)
    parts = list(iter_shards(s, require_complete))
    if not parts:
        raise CfjaxError(f"{s.out_dir} holds no finished shard yet")
    out = {}
    for k, v in parts[0].items():
        if v.ndim == 0:
            out[k] = v
        else:
            out[k] = np.concatenate([p[k] for p in parts], axis=1 if k in ("trajectory", "stage_success") else 0)
    out["seconds"] = np.float32(s.seconds)
    return out


def run_and_report(run: "ShardRun", compute, what: str, quiet: bool, summary, key: str, out) -> None:
    """:func:`run_shards`, then one line: queries, shards, time, and ``summary``'s ``key``
    (e.g. validity) averaged over this process's shards, weighted by their sizes."""
    t0 = time.perf_counter()
    run_shards(run, compute, what, quiet=quiet, summary=summary)
    done = [run.done[k] for k in run.mine]
    nq = sum(e["n"] for e in done)
    mean = sum(e[key] * e["n"] for e in done) / max(nq, 1)
    print(f"{what}: {nq} counterfactuals in {len(done)} shard(s) ({time.perf_counter() - t0:.1f}s this session, "
          f"{run.seconds:.1f}s recorded); {key.replace('_', ' ')} {mean:.4f} -> {out}/")
