"""How the ``adaptive`` ECINN step rule was chosen: fixed step extensions and search rules over
them, on mnist5k's test split (held out from the shipped flow and from the judges), judged by
the pixel-space judges of examples/ecinn_reference.py.

    python examples/ecinn_step_search.py [--model DIR] [--queries 400] [--json out.json]

Every query is explained towards each of the 9 other classes (no refinement, so the candidates
are compared as decoded). A candidate is the authors' rule 0.8 + 0.5 alpha0 extended by ``e``
along D_pq; a search rule keeps, per query, the farthest candidate whose decode leaves [0, 1] by
at most ``tau`` per pixel (cfjax.methods.ecinn.out_of_range), else the shortest. The 5,000
held-out reference queries are not used here: they are for the comparison with the authors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import model_dirs
from cfjax.data import load_dataset
from cfjax.methods import ecinn
from cfjax.models import flow_classifier as fc
from cfjax.models import judges
from cfjax.models import latent as latent_lib

EXTENSIONS = (-0.2, 0.0, 0.2, 0.4, 0.6)
SEARCHES = ((0.2, 0.0), (0.4, 0.2, 0.0), (0.6, 0.4, 0.2, 0.0), (0.4, 0.0))
TOLERANCES = (0.03, 0.04, 0.05)


def decode_candidates(params, config, x: np.ndarray, target: np.ndarray, batch: int = 500) -> dict:
    """For each extension e: clipped decode (N, H, W, C), out-of-range mass (N,), the model's
    class of the decode (N,); and the query's predicted class (N,)."""

    @jax.jit
    def one(x, t, e):
        z, _ = fc.encode(params, config, x)
        yp = jnp.argmax(latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test), -1)
        z_cf, _, _ = ecinn.latent_step(params["latent"], params["class_means"], z, yp, t, lambda a0: 0.8 + e + 0.5 * a0)
        raw = fc.decode(params, config, z_cf)
        x_cf = jnp.clip(raw, 0.0, 1.0)
        z1, _ = fc.encode(params, config, x_cf)
        p1 = jnp.argmax(latent_lib.class_logits(params["latent"], z1, config.latent.use_prior_at_test), -1)
        return x_cf, ecinn.out_of_range(raw), p1, yp

    out = {}
    for e in EXTENSIONS:
        parts = [one(jnp.asarray(x[i : i + batch]), jnp.asarray(target[i : i + batch]), e) for i in range(0, len(x), batch)]
        out[e] = [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(4)]
    return out


def main(argv=None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ecinn_reference as er

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cfjax/pretrained/mnist5k_flow")
    p.add_argument("--reference", default=str(Path(__file__).resolve().parents[2] / "shared/data/ecinn_reference"),
                   help="the reference folder (only its MNIST test images 0-4999, to train the judges)")
    p.add_argument("--judge-cache", default=str(Path.home() / ".cache/cfjax/judges_mnist9k.npz"))
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    m = model_dirs.load("flow", args.model)
    params = jax.tree.map(jnp.asarray, m.params)
    js = er.fit_judges(Path(args.reference), Path(args.judge_cache) if args.judge_cache else None)
    test = load_dataset("mnist5k", "test")
    n, c = min(args.queries, len(test)), m.config.num_classes
    x = np.repeat(test.images[:n], c, 0)
    q = np.tile(np.arange(c, dtype=np.int32), n)
    cand = decode_candidates(params, m.config, x, q)
    moved = cand[0.0][3] != q

    def score(x_cf, p1) -> dict:
        row = {"validity": round(float(np.mean(p1[moved] == q[moved])), 4)}
        for kind, j in js.items():
            row[f"judge_{kind}"] = round(float(np.mean(judges.predict(j, x_cf[moved]) == q[moved])), 4)
        return row

    rows = {}
    for e in EXTENSIONS:
        rows[f"fixed {e:+.1f}"] = score(cand[e][0], cand[e][2])
    for search in SEARCHES:
        for tau in TOLERANCES:
            ok = np.stack([cand[e][1] <= tau for e in search])
            ok[-1] = True
            pick = np.argmax(ok, 0)
            idx = np.arange(len(q))
            row = score(np.stack([cand[e][0] for e in search])[pick, idx], np.stack([cand[e][2] for e in search])[pick, idx])
            row["share_per_candidate"] = [round(float(v), 4) for v in np.bincount(pick[moved], minlength=len(search)) / moved.sum()]
            rows[f"search {search} tau {tau}"] = row
    for name, row in rows.items():
        print(f"{name:36s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    result = {"model": args.model, "queries": f"mnist5k test 0-{n - 1}, every other class", "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
