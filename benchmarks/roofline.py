"""Roofline helpers: FLOPs of a JAX program and the machine's measured ceilings.

Two FLOP counts of one program:

- :func:`jaxpr_flops` walks the program's jaxpr and counts the multiply-adds of every matrix
  product (``dot_general``) and convolution (``conv_general_dilated``) as 2 FLOPs each, the
  convolutions exactly (taps that fall on padding or on the holes of a dilated input are not
  counted, as XLA does not count them either), and multiplies the body of a ``scan`` (also a
  ``fori_loop`` with static bounds) by its length. A ``while_loop`` body is counted once and
  reported in ``while_loops``. This is the roofline's numerator: the work that runs on the
  compute units.
- :func:`xla_flops` asks XLA: ``jit(f).lower(...).compile().cost_analysis()["flops"]``. XLA also
  counts elementwise operations and reductions (one FLOP per element), and it counts the body of
  every loop once, whatever its trip count (checked: a 10-step ``fori_loop``/``scan`` of matrix
  products reports the FLOPs of one product). The XLA:CPU flags cfjax sets do not change it
  (checked with ``--xla_cpu_experimental_ynn_fusion_type=eltwise``: same count on the same
  program, see tests/test_roofline.py). So for loop-free programs the two counts agree up to the
  elementwise part, and for programs with loops the jaxpr count is the right one.

Ceilings, measured in the same process as the benchmark rows: a jitted float32 matrix product
(``n x n @ n x n``, 2 n^3 FLOPs) and the program's dominant convolution alone (the convolution
with the largest FLOP total in the program, at its shapes, without bias or activation), in JAX
and, where a PyTorch twin exists, in torch (``torch.mm`` / ``F.conv2d`` on NCHW tensors).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

# ----------------------------------------------------------------------------------------------
# FLOP counts


@dataclass(frozen=True)
class ConvSpec:
    """One convolution's static description (hashable: it keys the per-program totals)."""

    lhs_shape: tuple
    rhs_shape: tuple
    window_strides: tuple
    padding: tuple
    lhs_dilation: tuple
    rhs_dilation: tuple
    lhs_spec: tuple
    rhs_spec: tuple
    out_spec: tuple
    feature_group_count: int
    batch_group_count: int

    def flops(self) -> int:
        return conv_flops(self)

    def describe(self) -> str:
        n, c = self.lhs_shape[self.lhs_spec[0]], self.lhs_shape[self.lhs_spec[1]]
        sp = "x".join(str(self.lhs_shape[d]) for d in self.lhs_spec[2:])
        k = "x".join(str(self.rhs_shape[d]) for d in self.rhs_spec[2:])
        o = self.rhs_shape[self.rhs_spec[0]]
        kind = "forward" if self.is_forward_nhwc() else "gradient/other layout"
        return f"{k} conv {c}->{o} at {sp}, batch {n} ({kind})"

    def is_forward_nhwc(self) -> bool:
        """NHWC input, HWIO kernel, NHWC output, no groups, no input dilation: a plain forward conv."""
        nd = len(self.lhs_shape)
        return (self.lhs_spec == (0, nd - 1, *range(1, nd - 1)) and self.rhs_spec == (nd - 1, nd - 2, *range(nd - 2))
                and self.out_spec == self.lhs_spec and self.feature_group_count == 1 and self.batch_group_count == 1
                and all(d == 1 for d in self.lhs_dilation))


def _valid_taps(size: int, k: int, stride: int, pad: tuple, lhs_dil: int, rhs_dil: int) -> int:
    """Sum over output positions of the kernel taps that land on a real input element."""
    lo, hi = int(pad[0]), int(pad[1])
    dil_size = (size - 1) * lhs_dil + 1 if size > 0 else 0
    span = (k - 1) * rhs_dil + 1
    out = (lo + dil_size + hi - span) // stride + 1
    if out <= 0:
        return 0
    p = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * rhs_dil - lo
    ok = (p >= 0) & (p < dil_size) & (p % lhs_dil == 0)
    return int(ok.sum())


def conv_flops(c: ConvSpec) -> int:
    """2 x (output elements) x (input features per group) x (valid taps per output), summed."""
    out_batch = c.lhs_shape[c.lhs_spec[0]] // c.batch_group_count
    out_feat = c.rhs_shape[c.rhs_spec[0]]
    in_feat = c.rhs_shape[c.rhs_spec[1]]
    taps = 1
    for i, (ld, rd) in enumerate(zip(c.lhs_spec[2:], c.rhs_spec[2:])):
        taps *= _valid_taps(c.lhs_shape[ld], c.rhs_shape[rd], c.window_strides[i], c.padding[i], c.lhs_dilation[i], c.rhs_dilation[i])
    return 2 * out_batch * out_feat * in_feat * taps


def _conv_spec(eqn) -> ConvSpec:
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    return ConvSpec(tuple(lhs.shape), tuple(rhs.shape), tuple(p["window_strides"]), tuple(tuple(x) for x in p["padding"]),
                    tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]), tuple(dn.lhs_spec), tuple(dn.rhs_spec),
                    tuple(dn.out_spec), int(p["feature_group_count"]), int(p["batch_group_count"]))


def _dot_flops(eqn) -> int:
    (lc, _rc), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lc)


def _sub_jaxprs(value):
    from jax._src import core

    if isinstance(value, core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, core.Jaxpr):
        return [value]
    return []


def _walk(jaxpr, mult: float, acc: dict) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            f = _dot_flops(eqn) * mult
            acc["dot"] += f
        elif name == "conv_general_dilated":
            spec = _conv_spec(eqn)
            f = spec.flops() * mult
            acc["conv"] += f
            acc["convs"][spec] = acc["convs"].get(spec, 0.0) + f
        elif name == "scan":
            _walk(eqn.params["jaxpr"].jaxpr, mult * int(eqn.params["length"]), acc)
        elif name == "while":
            acc["while_loops"] += 1
            _walk(eqn.params["cond_jaxpr"].jaxpr, mult, acc)
            _walk(eqn.params["body_jaxpr"].jaxpr, mult, acc)
        elif name == "cond":
            branches = []
            for br in eqn.params["branches"]:
                sub = _new_acc()
                _walk(br.jaxpr, mult, sub)
                branches.append(sub)
            worst = max(branches, key=lambda a: a["dot"] + a["conv"])  # the costlier branch
            _merge(acc, worst)
        else:
            for v in eqn.params.values():
                for sub in _sub_jaxprs(v):
                    _walk(sub, mult, acc)
                if isinstance(v, (tuple, list)):
                    for item in v:
                        for sub in _sub_jaxprs(item):
                            _walk(sub, mult, acc)


def _new_acc() -> dict:
    return {"dot": 0.0, "conv": 0.0, "convs": {}, "while_loops": 0}


def _merge(acc: dict, other: dict) -> None:
    acc["dot"] += other["dot"]
    acc["conv"] += other["conv"]
    acc["while_loops"] += other["while_loops"]
    for k, v in other["convs"].items():
        acc["convs"][k] = acc["convs"].get(k, 0.0) + v


def jaxpr_flops(fn: Callable, *args, **kwargs) -> dict:
    """Matrix-product and convolution FLOPs of ``fn(*args, **kwargs)`` (see the module docstring).

    Returns {"flops", "dot_flops", "conv_flops", "while_loops", "dominant_conv" (a ConvSpec or
    None), "dominant_conv_share" (its fraction of all FLOPs)}. Dead code is removed first where
    jax's dead-code elimination applies (outputs not returned are not counted)."""
    import jax

    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    jaxpr = closed.jaxpr
    try:
        from jax._src.interpreters import partial_eval as pe

        jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    except Exception:  # noqa: BLE001 - a future jax's DCE: count without it
        pass
    acc = _new_acc()
    _walk(jaxpr, 1.0, acc)
    total = acc["dot"] + acc["conv"]
    dom = max(acc["convs"], key=acc["convs"].get) if acc["convs"] else None
    fwd = {k: v for k, v in acc["convs"].items() if k.is_forward_nhwc()}
    dom_fwd = max(fwd, key=fwd.get) if fwd else None
    share = lambda c: (acc["convs"][c] / total) if c is not None and total else None  # noqa: E731
    return {"flops": total, "dot_flops": acc["dot"], "conv_flops": acc["conv"], "while_loops": acc["while_loops"],
            "dominant_conv": dom, "dominant_conv_share": share(dom),
            "dominant_forward_conv": dom_fwd, "dominant_forward_conv_share": share(dom_fwd),
            "distinct_convs": len(acc["convs"])}


def summary(count: dict) -> dict:
    """The JSON-able part of a :func:`jaxpr_flops` result."""
    out = {k: v for k, v in count.items() if not isinstance(v, ConvSpec) and k not in ("dominant_conv", "dominant_forward_conv")}
    out["dominant_conv"] = conv_dict(count.get("dominant_conv"))
    out["dominant_forward_conv"] = conv_dict(count.get("dominant_forward_conv"))
    return out


def xla_flops(fn: Callable, *args, **kwargs) -> float | None:
    """XLA's own count for the compiled program (loop bodies once; elementwise ops included)."""
    import jax

    try:
        ca = jax.jit(fn).lower(*args, **kwargs).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


# ----------------------------------------------------------------------------------------------
# ceilings


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(statistics.median(ts)), float(min(ts))


def _rate(flops: float, med: float, best: float) -> dict:
    return {"flops": flops, "median_s": med, "gflop_s": flops / med / 1e9, "best_gflop_s": flops / best / 1e9}


def jax_matmul_fn(n: int = 2048) -> Callable[[], Any]:
    """One jitted float32 ``n x n @ n x n`` product, blocking (2 n^3 FLOPs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return lambda: jax.block_until_ready(mm(a, b))


def jax_matmul_ceiling(n: int = 2048, repeats: int = 5) -> dict:
    med, best = _median_time(jax_matmul_fn(n), repeats)
    return {"what": f"jit(matmul) float32 {n}x{n} @ {n}x{n}", **_rate(2.0 * n**3, med, best)}


def jax_conv_fn(c: ConvSpec) -> Callable[[], Any]:
    """``c`` alone: ``lax.conv_general_dilated`` at its shapes and settings, jitted, float32, blocking."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    nd = len(c.lhs_shape)

    def spec_str(spec, first, second):
        s = [""] * nd
        s[spec[0]], s[spec[1]] = first, second
        for i, d in enumerate(spec[2:]):
            s[d] = "HWDXYZ"[i]
        return "".join(s)

    dn = (spec_str(c.lhs_spec, "N", "C"), spec_str(c.rhs_spec, "O", "I"), spec_str(c.out_spec, "N", "C"))
    x = jax.random.normal(jax.random.key(0), c.lhs_shape, jnp.float32)
    w = jax.random.normal(jax.random.key(1), c.rhs_shape, jnp.float32) * 0.1
    f = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, c.window_strides, c.padding, c.lhs_dilation, c.rhs_dilation, dn,
                                                      c.feature_group_count, c.batch_group_count))
    return lambda: jax.block_until_ready(f(x, w))


def jax_conv_ceiling(c: ConvSpec, repeats: int = 5) -> dict:
    med, best = _median_time(jax_conv_fn(c), repeats)
    return {"what": f"jit(conv_general_dilated) {c.describe()}", **_rate(float(c.flops()), med, best)}


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def torch_matmul_fn(n: int = 2048, device: str = "cpu") -> Callable[[], Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    sync = _sync(device)

    def f():
        with torch.inference_mode():
            torch.mm(a, b)
        sync()

    return f


def torch_matmul_ceiling(n: int = 2048, repeats: int = 5, device: str = "cpu") -> dict:
    import torch

    med, best = _median_time(torch_matmul_fn(n, device), repeats)
    return {"what": f"torch.mm float32 {n}x{n} @ {n}x{n} ({torch.get_num_threads()} threads)" if device == "cpu" else f"torch.mm float32 {n}x{n} on {device}",
            **_rate(2.0 * n**3, med, best)}


def torch_conv_fn(c: ConvSpec, device: str = "cpu") -> Callable[[], Any] | None:
    """The same convolution as ``F.conv2d`` on NCHW tensors; None where it is not a plain 2-D forward conv."""
    import torch
    import torch.nn.functional as F

    if not c.is_forward_nhwc() or len(c.lhs_shape) != 4:
        return None
    n, h, w_, ci = c.lhs_shape
    kh, kw, _, co = c.rhs_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w_, generator=g).to(device)
    w = (torch.randn(co, ci, kh, kw, generator=g) * 0.1).to(device)
    (pt, pb), (pl, pr) = c.padding
    sym = pt == pb and pl == pr and min(pt, pl) >= 0
    sync = _sync(device)

    def f():
        with torch.inference_mode():
            xi = x if sym else F.pad(x, (pl, pr, pt, pb))
            F.conv2d(xi, w, None, tuple(c.window_strides), (pt, pl) if sym else 0, tuple(c.rhs_dilation))
        sync()

    return f


def torch_conv_ceiling(c: ConvSpec, repeats: int = 5, device: str = "cpu") -> dict | None:
    import torch

    f = torch_conv_fn(c, device)
    if f is None:
        return None
    med, best = _median_time(f, repeats)
    return {"what": f"F.conv2d {c.describe()}" + (f" ({torch.get_num_threads()} threads)" if device == "cpu" else f" on {device}"),
            **_rate(float(c.flops()), med, best)}


def interleaved_ratios(program: Callable[[], Any], program_flops: float, conv: Callable[[], Any] | None, conv_flops: float,
                       matmul: Callable[[], Any], matmul_flops: float, repeats: int = 5) -> dict:
    """The program, its dominant conv alone and the matmul, timed in turn ``repeats`` times (after
    one warm-up each): the median over repeats of achieved GFLOP/s and of the program's fraction
    of each ceiling *within the same repeat*, so load from other jobs on a shared machine hits the
    program and its ceilings alike."""
    fns = {"program": program, "matmul": matmul}
    if conv is not None:
        fns["conv"] = conv
    flops = {"program": program_flops, "matmul": matmul_flops, "conv": conv_flops}
    for f in fns.values():
        f()
    rates = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            rates[k].append(flops[k] / (time.perf_counter() - t0) / 1e9)
    out = {f"{k}_gflop_s": float(statistics.median(v)) for k, v in rates.items()}
    for k in ("conv", "matmul"):
        if k in rates:
            out[f"program_of_{k}"] = float(statistics.median([p / c for p, c in zip(rates["program"], rates[k])]))
    out["repeats"] = repeats
    return out


def default_matmul_n() -> int:
    import jax

    return 2048 if jax.devices()[0].platform == "cpu" else 8192


def ceilings(conv: ConvSpec | None, twin: bool = True, repeats: int = 5, n: int | None = None, log=print,
             twin_device: str = "cpu") -> dict:
    """The machine's ceilings for one benchmark, measured now: matmul and the dominant conv, for
    JAX (XLA's default threads: all cores) and (``twin``) torch at the faster of all cores and one
    thread (like the twin's rows). Restores torch's thread count afterwards."""
    import os

    n = n or default_matmul_n()
    out = {"matmul": {"cfjax": jax_matmul_ceiling(n, repeats)}}
    if conv is not None:
        out["dominant_conv"] = {"spec": conv_dict(conv), "cfjax": jax_conv_ceiling(conv, repeats)}
    if twin:
        import torch

        before = torch.get_num_threads()
        counts = sorted({1, os.cpu_count() or 1}, reverse=True) if twin_device == "cpu" else [before]
        try:  # the twin's ceiling at its faster thread count, as its rows (benchmarks.common.pick_torch_threads)
            tries = {}
            for k in counts:
                torch.set_num_threads(k)
                tries[k] = (torch_matmul_ceiling(n, repeats, twin_device),
                            torch_conv_ceiling(conv, repeats, twin_device) if conv is not None else None)
            out["matmul"]["twin"] = max((t[0] for t in tries.values()), key=lambda r: r["gflop_s"])
            if conv is not None and all(t[1] is not None for t in tries.values()):
                out["dominant_conv"]["twin"] = max((t[1] for t in tries.values()), key=lambda r: r["gflop_s"])
            elif conv is not None:
                out["dominant_conv"]["twin"] = None
        finally:
            torch.set_num_threads(before)
    for k, v in out.items():
        sides = ", ".join(f"{s} {v[s]['gflop_s']:.1f}" for s in ("cfjax", "twin") if isinstance(v.get(s), dict))
        log(f"ceiling {k}: {sides} GFLOP/s")
    return out


def conv_dict(c: ConvSpec | None) -> dict | None:
    if c is None:
        return None
    d = asdict(c)
    d["flops"] = c.flops()
    d["describe"] = c.describe()
    return d


def annotate_rows(rows: list[dict], flops_per_call: Callable[[int], float], ceil: dict) -> None:
    """Add roofline columns to benchmark rows in place: FLOPs per call and per item, achieved
    GFLOP/s of each side (the twin does the same work: its parity with cfjax is checked), and
    the fraction of the same side's dominant-conv ceiling."""
    conv = ceil.get("dominant_conv") or {}
    for r in rows:
        if r.get("skipped"):
            continue
        f = float(flops_per_call(r["batch"]))
        r["flops_per_call"] = f
        r["flops_per_item"] = f / r["batch"]
        for side in ("cfjax", "twin"):
            if f"{side}_s" not in r:
                continue
            g = f / r[f"{side}_s"] / 1e9
            r[f"{side}_gflop_s"] = g
            c = conv.get(side)
            if isinstance(c, dict):
                r[f"{side}_of_conv_ceiling"] = g / c["gflop_s"]
            m = ceil["matmul"].get(side)
            if isinstance(m, dict):
                r[f"{side}_of_matmul_ceiling"] = g / m["gflop_s"]


def attach(res: dict, count_at: Callable[[int], dict], twin: bool = True, xla_at: Callable[[int], float | None] | None = None,
           log=print, repeats: int = 5, headline_fns: dict | None = None) -> dict:
    """Roofline columns for a finished benchmark result ``res`` (rows + headline), in place.

    ``count_at(batch)`` -> :func:`jaxpr_flops` of the timed program at that batch (a trace, no
    compilation); ``xla_at(batch)`` -> XLA's count of the same program (optional, compared at the
    headline batch). The ceilings are measured now, in this process: a float32 matrix product
    and the program's dominant forward convolution (the dominant convolution of any kind where
    none is a plain forward one), for cfjax and (``twin``) torch."""
    import os

    head = res["headline"]["batch"]
    count = count_at(head)
    conv = count["dominant_forward_conv"] or count["dominant_conv"]
    ceil = ceilings(conv, twin=twin, repeats=repeats, log=log, twin_device=res.get("twin_device", "cpu"))
    cache = {head: count["flops"]}

    def flops(b):
        if b not in cache:
            cache[b] = count_at(b)["flops"]
        return cache[b]

    annotate_rows(res["rows"], flops, ceil)
    info = {"count_at_headline": summary(count), "ceilings": ceil,
            "load_average_at_ceilings": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else [],
            "method": ("FLOPs per call: matrix-product + convolution multiply-adds x 2 of the timed jax program, scan "
                       "bodies times their length (benchmarks.roofline.jaxpr_flops); the twin computes the same function "
                       "(parity-checked), so the same count is its work. Achieved GFLOP/s = FLOPs per call / median "
                       "seconds per call. Ceilings measured in the same process after the rows (median of "
                       f"{repeats} calls after 2 warm-ups): matmul and the dominant forward conv alone.")}
    if xla_at is not None:
        x = xla_at(head)
        info["xla_cost_analysis_flops_at_headline"] = x
        info["xla_over_jaxpr"] = None if not x or not count["flops"] else x / count["flops"]
        info["xla_note"] = ("XLA's cost analysis counts elementwise ops and reductions too, and every loop body once: "
                            "above 1 by the elementwise share for loop-free programs, below 1 where a scan/fori_loop repeats work")
    if headline_fns:  # the headline program and its ceilings in turn: ratios robust to other jobs' load
        n = default_matmul_n()
        dev = res.get("twin_device", "cpu")
        inter = {}
        for side, fn in headline_fns.items():
            if side == "cfjax":
                cf, mm = (jax_conv_fn(conv) if conv is not None else None), jax_matmul_fn(n)
            else:
                import torch

                best_threads = res["rows"][[r["batch"] for r in res["rows"]].index(head)].get("twin_threads") if any(r["batch"] == head for r in res["rows"]) else None
                if best_threads and dev == "cpu":
                    torch.set_num_threads(int(best_threads))
                cf, mm = (torch_conv_fn(conv, dev) if conv is not None else None), torch_matmul_fn(n, dev)
            inter[side] = interleaved_ratios(fn, count["flops"], cf, conv.flops() if conv is not None else 0.0, mm, 2.0 * n**3, repeats)
            log(f"interleaved at batch {head}, {side}: program {inter[side]['program_gflop_s']:.1f} GFLOP/s = "
                f"{inter[side].get('program_of_conv', float('nan')):.2f} of its dominant conv, {inter[side]['program_of_matmul']:.2f} of matmul")
        info["interleaved_at_headline"] = inter
    res["roofline"] = info
    return info


# ----------------------------------------------------------------------------------------------
# the roofline table of a results folder: python -m benchmarks.roofline [DIR]

_UNITS = {"ecinn": ("cf_per_s", "cf/s", "item = one counterfactual"),
          "disc": ("step_images_per_s", "step-images/s", "item = one image x one optimisation step (a whole generate() call's FLOPs / steps)"),
          "train_flow": ("images_per_s", "img/s", "item = one training image")}


def markdown_table(results_dir, tag: str = "cpu") -> str:
    """One markdown row per benchmark row of ``<name>_<tag>.json`` in ``results_dir`` that carries
    roofline columns (ECINN's IB-INN rows included), then the ceilings and the interleaved ratios."""
    import json
    from pathlib import Path

    lines = ["| benchmark | batch | MFLOP per item | cfjax items/s | twin items/s | speedup | cfjax GFLOP/s | twin GFLOP/s | cfjax / its conv ceiling | twin / its conv ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, (key, unit, item) in _UNITS.items():
        path = Path(results_dir) / f"{name}_{tag}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        parts = [(name, r)]
        if r.get("ibinn"):
            parts.append((f"{name} (IB-INN flow)" if any("twin_s" in x for x in r["ibinn"]["rows"]) else f"{name} (IB-INN flow, no twin)", r["ibinn"]))
        for label, part in parts:
            per = (part.get("settings") or {}).get("steps_per_call", 1) if name == "disc" else 1
            for row in part["rows"]:
                if row.get("skipped") or "flops_per_item" not in row:
                    continue
                tw = lambda k, fmt: (fmt.format(row[k]) if k in row else "–")  # noqa: E731
                lines.append(f"| {label} | {row['batch']} | {row['flops_per_item'] / per / 1e6:.1f} | {row[f'cfjax_{key}']:.0f} | "
                             f"{tw(f'twin_{key}', '{:.0f}')} | {tw('speedup', '{:.2f}x')} | {row['cfjax_gflop_s']:.1f} | "
                             f"{tw('twin_gflop_s', '{:.1f}')} | {tw('cfjax_of_conv_ceiling', '{:.2f}')} | {tw('twin_of_conv_ceiling', '{:.2f}')} |")
            ro = part.get("roofline") or {}
            ceil = ro.get("ceilings") or {}
            dc = (ceil.get("dominant_conv") or {})
            side = lambda d, s: (f"{d[s]['gflop_s']:.1f}" if isinstance(d.get(s), dict) else "–")  # noqa: E731
            cnt = ro.get("count_at_headline") or {}
            dom = (dc.get("spec") or {}).get("describe", "–")
            notes.append(f"- **{label}**: {item}; dominant forward conv {dom} ({(cnt.get('dominant_forward_conv_share') or 0):.0%} of the FLOPs); "
                         f"ceilings after the rows, cfjax / twin: matmul {side(ceil.get('matmul', {}), 'cfjax')} / {side(ceil.get('matmul', {}), 'twin')}, "
                         f"that conv {side(dc, 'cfjax')} / {side(dc, 'twin')} GFLOP/s"
                         + (f"; XLA's count / ours {ro['xla_over_jaxpr']:.3f}" if ro.get("xla_over_jaxpr") else ""))
            for s, v in (ro.get("interleaved_at_headline") or {}).items():
                notes.append(f"  - interleaved at batch {part['headline']['batch']}, {s}: program {v['program_gflop_s']:.1f} GFLOP/s, "
                             f"conv alone {v.get('conv_gflop_s', float('nan')):.1f}, matmul {v['matmul_gflop_s']:.1f}: "
                             f"program = {v.get('program_of_conv', float('nan')):.2f} of the conv, {v['program_of_matmul']:.2f} of the matmul")
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    import sys as _sys

    print(markdown_table(_sys.argv[1] if len(_sys.argv) > 1 else "benchmarks/results", _sys.argv[2] if len(_sys.argv) > 2 else "cpu"))
