"""bfloat16 exploration (not used by cfjax: everything there stays float32): speed and what moves.

    python -m benchmarks.bf16 [--batch 256] [--n 1024] [--repeats 5] [--out benchmarks/results/bf16_cpu.json]

Two forward programs, each timed in float32 and with parameters and inputs cast to bfloat16
(the same jitted function; JAX then computes in bfloat16), interleaved in one process:

- the DISC classifier (``mnist5k_classifier``): logits and the input gradient of the
  cross-entropy to the next class, the core of a DISC step. Reported: agreement of the
  predicted class with float32 over ``--n`` test digits, the largest probability difference, and
  the cosine between the float32 and bfloat16 input gradients.
- the shipped IB-INN flow (``mnist5k_flow``): encode. Reported: agreement of the flow's class
  prediction, the relative latent error, and the flow's invertibility error in bfloat16
  (decode(encode(x)) - x, max abs), next to float32's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common


def cast(tree, dtype):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class bf16_convs:
    """Within this context every ``jax.lax.conv_general_dilated`` traced gets bfloat16 operands and
    accumulates in float32 (``preferred_element_type``), everything else stays float32: mixed
    precision for the convolutions alone, without touching cfjax's code (which calls the
    function through ``jax.lax`` at trace time)."""

    def __enter__(self):
        import jax
        import jax.numpy as jnp

        self.orig = orig = jax.lax.conv_general_dilated

        def conv(lhs, rhs, *a, **kw):
            kw.setdefault("preferred_element_type", jnp.float32)
            return orig(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), *a, **kw)

        jax.lax.conv_general_dilated = conv
        return self

    def __exit__(self, *exc):
        import jax

        jax.lax.conv_general_dilated = self.orig
        return False


def bf16_conv_count(fn, *args) -> dict:
    """How many convolutions of fn's jaxpr (nested ones included) take bfloat16 operands."""
    import jax
    import jax.numpy as jnp

    seen = {"bf16": 0, "other": 0}

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "conv_general_dilated":
                seen["bf16" if e.invars[0].aval.dtype == jnp.bfloat16 else "other"] += 1
            for v in e.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else [v]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return seen


def timeit(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f(), f()
    ts = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bf16", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n", type=int, default=1024, help="test digits for the agreement metrics")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from cfjax.data import load_dataset
    from cfjax.models import flow_classifier as fc
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    test = load_dataset("mnist5k", "test").images
    xs = np.resize(test, (max(args.n, args.batch), *test.shape[1:])).astype(np.float32)
    res = {"benchmark": "bf16", "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind, "cores": os.cpu_count()},
           "command": "python -m benchmarks.bf16 " + " ".join(argv if argv is not None else sys.argv[1:]), "batch": args.batch, "n": args.n,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}

    # -- classifier: logits + input gradient
    apply_fn, variables, _, _ = load_classifier(default_model_dir("classifier", "mnist5k"))

    def cls_body(variables, x):
        logits = apply_fn(variables, x, train=False)
        t = (jnp.argmax(logits, -1) + 1) % logits.shape[-1]

        def loss(x):
            lg = apply_fn(variables, x, train=False).astype(jnp.float32)
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(lg, -1), t[:, None], -1))

        return logits, jax.grad(loss)(x)

    cls = jax.jit(cls_body)
    v16 = cast(variables, jnp.bfloat16)
    xb = jnp.asarray(xs[: args.batch])
    t = timeit({"float32": lambda: jax.block_until_ready(cls(variables, xb)),
                "bfloat16": lambda: jax.block_until_ready(cls(v16, xb.astype(jnp.bfloat16)))}, args.repeats)
    l32, g32, l16, g16 = [], [], [], []
    for i in range(0, args.n, args.batch):
        x = jnp.asarray(xs[i:i + args.batch])
        a, b = cls(variables, x)
        c, d = cls(v16, x.astype(jnp.bfloat16))
        l32.append(np.asarray(a)), g32.append(np.asarray(b)), l16.append(np.asarray(c, np.float32)), g16.append(np.asarray(d, np.float32))
    l32, g32, l16, g16 = map(np.concatenate, (l32, g32, l16, g16))
    p32, p16 = jax.nn.softmax(l32, -1), jax.nn.softmax(l16, -1)
    gc = np.sum(g32 * g16, axis=(1, 2, 3)) / (np.linalg.norm(g32.reshape(len(g32), -1), axis=1) * np.linalg.norm(g16.reshape(len(g16), -1), axis=1) + 1e-30)
    res["classifier"] = {"s_per_batch": t, "bf16_speedup": t["float32"] / t["bfloat16"],
                         "same_prediction": float(np.mean(l32.argmax(-1) == l16.argmax(-1))),
                         "max_prob_diff": float(np.abs(np.asarray(p32) - np.asarray(p16)).max()),
                         "input_grad_cosine_min": float(gc.min()), "input_grad_cosine_mean": float(gc.mean()),
                         "bf16_logits_dtype": str(cls(v16, xb.astype(jnp.bfloat16))[0].dtype)}
    print(f"classifier fwd+input grad, batch {args.batch}: f32 {t['float32'] * 1e3:.1f} ms, bf16 {t['bfloat16'] * 1e3:.1f} ms; "
          f"same prediction {res['classifier']['same_prediction']:.4f}, grad cosine min {gc.min():.4f}", flush=True)

    # -- IB-INN flow: encode (and the round trip). Casting its parameters to bfloat16 does not run: its
    # code promotes activations to float32 and a convolution then sees mixed dtypes. So: bfloat16
    # convolutions (float32 accumulation) inside an otherwise float32 flow (bf16_convs).
    params, config, _ = load_flow(default_model_dir("flow", "mnist5k"))
    enc = jax.jit(lambda p, x: fc.encode(p, config, x)[0])
    rt = jax.jit(lambda p, x: fc.decode(p, config, fc.encode(p, config, x)[0]))
    probs = jax.jit(lambda p, x: fc.predict_proba(p, config, x))
    enc16 = jax.jit(lambda p, x: fc.encode(p, config, x)[0] + 0.0)  # distinct functions: traced under bf16_convs
    rt16 = jax.jit(lambda p, x: fc.decode(p, config, fc.encode(p, config, x)[0]) + 0.0)
    probs16 = jax.jit(lambda p, x: fc.predict_proba(p, config, x) + 0.0)
    with bf16_convs():
        for f in (enc16, rt16, probs16):
            f.lower(params, xb).compile()  # trace + compile now, with the patch
        enc16_c = enc16.lower(params, xb).compile()
        rt16_c, probs16_c = rt16.lower(params, xb).compile(), probs16.lower(params, xb).compile()
    t = timeit({"float32": lambda: jax.block_until_ready(enc(params, xb)),
                "bf16_convs": lambda: jax.block_until_ready(enc16_c(params, xb))}, args.repeats)
    z32, z16, y32, y16, e32, e16 = [], [], [], [], [], []
    for i in range(0, args.n - args.batch + 1, args.batch):
        x = jnp.asarray(xs[i:i + args.batch])
        z32.append(np.asarray(enc(params, x))), z16.append(np.asarray(enc16_c(params, x)))
        y32.append(np.asarray(probs(params, x)).argmax(-1)), y16.append(np.asarray(probs16_c(params, x)).argmax(-1))
        e32.append(np.abs(np.asarray(rt(params, x)) - np.asarray(x)).max()), e16.append(np.abs(np.asarray(rt16_c(params, x)) - np.asarray(x)).max())
    z32, z16 = np.concatenate(z32), np.concatenate(z16)
    res["ibinn_flow"] = {"s_per_batch_encode": t, "bf16_convs_speedup": t["float32"] / t["bf16_convs"],
                         "same_prediction": float(np.mean(np.concatenate(y32) == np.concatenate(y16))),
                         "latent_rel_error": float(np.linalg.norm(z16 - z32) / np.linalg.norm(z32)),
                         "invertibility_max_abs_float32": float(max(e32)), "invertibility_max_abs_bf16_convs": float(max(e16)),
                         "note": "bf16_convs: every convolution with bfloat16 operands, float32 accumulation; the rest float32"}
    print(f"IB-INN encode, batch {args.batch}: f32 {t['float32'] * 1e3:.1f} ms, bf16 convs {t['bf16_convs'] * 1e3:.1f} ms; "
          f"same prediction {res['ibinn_flow']['same_prediction']:.4f}, invertibility f32 {max(e32):.2e} bf16 convs {max(e16):.2e}", flush=True)

    # -- the classifier with bf16 convolutions only (float32 elsewhere), as the flow
    with bf16_convs():
        cls16_c = jax.jit(lambda v, x: cls_body(v, x)).lower(variables, xb).compile()
        res["bf16_convs_check"] = {"classifier": bf16_conv_count(lambda v, x: cls_body(v, x), variables, xb),
                                   "ibinn_encode": bf16_conv_count(lambda p, x: fc.encode(p, config, x)[0], params, xb)}
    t = timeit({"float32": lambda: jax.block_until_ready(cls(variables, xb)),
                "bf16_convs": lambda: jax.block_until_ready(cls16_c(variables, xb))}, args.repeats)
    a, b = cls(variables, xb)
    c, d = cls16_c(variables, xb)
    a, b, c, d = (np.asarray(v, np.float32) for v in (a, b, c, d))
    gc = np.sum(b * d, axis=(1, 2, 3)) / (np.linalg.norm(b.reshape(len(b), -1), axis=1) * np.linalg.norm(d.reshape(len(d), -1), axis=1) + 1e-30)
    res["classifier_bf16_convs"] = {"s_per_batch": t, "bf16_convs_speedup": t["float32"] / t["bf16_convs"],
                                    "same_prediction": float(np.mean(a.argmax(-1) == c.argmax(-1))), "input_grad_cosine_min": float(gc.min())}
    print(f"classifier fwd+input grad with bf16 convs, batch {args.batch}: f32 {t['float32'] * 1e3:.1f} ms, bf16 convs {t['bf16_convs'] * 1e3:.1f} ms", flush=True)
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    tag = "cpu" if res["device"]["platform"] == "cpu" else "gpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"bf16_{tag}.json")
    common.save_json(res, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
