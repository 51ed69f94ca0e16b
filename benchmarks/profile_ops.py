"""Per-op timing of the hot convolutions, XLA:CPU (jax.jit) vs torch (oneDNN), same shapes.

    python -m benchmarks.profile_ops [--batch 256] [--threads 1] [--out benchmarks/results/profile_ops_cpu.json]

The shapes are those of the shipped Glow's coupling subnets (ECINN, flow training) and of the
DISC CNN; forward, and for DISC also the gradient with respect to the input. Both sides run with
the same thread count (XLA via --xla_cpu_multi_thread_eigen / intra-op flags is not adjustable
at run time, so run this in a fresh process; ``--threads 1`` sets torch to 1 thread and JAX to
one CPU thread through XLA_FLAGS before jax is imported).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks import common

    torch.set_num_threads(a.threads)
    b = a.batch
    dn = ("NHWC", "HWIO", "NHWC")
    # (name, h, w, c_in, c_out, k)
    shapes = [
        ("glow L0 conv1 3x3", 14, 14, 2, 32, 3), ("glow L0 conv2 1x1", 14, 14, 32, 32, 1), ("glow L0 conv3 3x3", 14, 14, 32, 4, 3),
        ("glow L1 conv1 3x3", 7, 7, 8, 64, 3), ("glow L1 conv2 1x1", 7, 7, 64, 64, 1), ("glow L1 conv3 3x3", 7, 7, 64, 16, 3),
        ("disc conv1 3x3", 28, 28, 1, 32, 3), ("disc conv2 3x3", 28, 28, 32, 32, 3), ("disc conv3 3x3", 14, 14, 32, 64, 3), ("disc conv4 3x3", 14, 14, 64, 64, 3),
    ]
    rows = []
    rng = np.random.default_rng(0)
    for name, h, w, ci, co, k in shapes:
        x = rng.standard_normal((b, h, w, ci)).astype(np.float32)
        wt = rng.standard_normal((k, k, ci, co)).astype(np.float32) * 0.1
        xj, wj = jnp.asarray(x), jnp.asarray(wt)
        fj = jax.jit(lambda x_, w_: jax.lax.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=dn))
        gj = jax.jit(jax.grad(lambda x_, w_: jnp.sum(jax.lax.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=dn) ** 2)))
        xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
        wtt = torch.as_tensor(wt.transpose(3, 2, 0, 1).copy())
        xg = xt.clone().requires_grad_(True)

        def tg():
            xg.grad = None
            (F.conv2d(xg, wtt, padding=k // 2) ** 2).sum().backward()

        fns = {
            "jax_fwd": lambda: jax.block_until_ready(fj(xj, wj)),
            "torch_fwd": lambda: F.conv2d(xt, wtt, padding=k // 2),
            "jax_fwd_bwd_input": lambda: jax.block_until_ready(gj(xj, wj)),
            "torch_fwd_bwd_input": tg,
        }
        for f in fns.values():
            f(), f()
        t = common.interleaved(fns, a.repeats)
        flops = 2 * b * h * w * ci * co * k * k
        row = {"op": name, "shape": [b, h, w, ci, co, k], "gflop_fwd": flops / 1e9}
        for kk, v in t.items():
            row[f"{kk}_ms"] = 1e3 * common.median(v)
        row["fwd_torch_over_jax"] = row["jax_fwd_ms"] and row["torch_fwd_ms"] / row["jax_fwd_ms"]
        row["fwd_bwd_torch_over_jax"] = row["torch_fwd_bwd_input_ms"] / row["jax_fwd_bwd_input_ms"]
        row["jax_fwd_gflops"] = flops / 1e9 / (row["jax_fwd_ms"] / 1e3)
        row["torch_fwd_gflops"] = flops / 1e9 / (row["torch_fwd_ms"] / 1e3)
        rows.append(row)
        print(f"{name:20s} jax {row['jax_fwd_ms']:7.2f} ms ({row['jax_fwd_gflops']:5.1f} GF/s)  torch {row['torch_fwd_ms']:7.2f} ms ({row['torch_fwd_gflops']:5.1f} GF/s)"
              f"  | fwd+bwd_x jax {row['jax_fwd_bwd_input_ms']:7.2f} torch {row['torch_fwd_bwd_input_ms']:7.2f}", flush=True)
    res = {"benchmark": "profile_ops", "device": common.device_info(), "threads": a.threads, "batch": b, "versions": common.versions(),
           "load_average": common.load_average(), "rows": rows, "command": " ".join(["python -m benchmarks.profile_ops"] + (argv or sys.argv[1:]))}
    common.save_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
