"""What do a flow's class means look like? Decode them and ask the flow and the independent oracle.

    python examples/flow_latent_diagnosis.py [--flow DIR] [--out docs/figures/flow_class_means.png] [--json FILE]

For a generative classifier whose class-conditional latents are Gaussians around their means,
decoding a class's mean latent gives an "average digit" of that class, and ECINN's step between
class means changes the digit's shape. This decodes, for every class c,
  - m_c: the empirical mean latent of the training images predicted as c (what ECINN steps between)
  - mu_c: the learned mean of the class-conditional Gaussian,
then reports the flow's and the oracle's (cfjax/pretrained/mnist5k_oracle) class for each decoded
image, and how far test latents lie from their own class mean. The PNG shows both rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def diagnose(flow_dir: str | Path, data: str = "mnist5k") -> tuple[dict, dict]:
    from cfjax.data import load_dataset
    from cfjax.models import flow_classifier as fc
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    params, config, _ = load_flow(flow_dir)
    oracle_fn, oracle_vars, _, _ = load_classifier(default_model_dir("oracle", data))
    decode = jax.jit(lambda p, z: fc.decode(p, config, z))
    flow_logits = jax.jit(lambda p, x: fc.class_logits(p, config, x))
    encode = jax.jit(lambda p, x: fc.encode(p, config, x)[0])
    report, images = {"flow": str(flow_dir)}, {}
    classes = np.arange(config.num_classes)
    for name, z in (("empirical_means", params["class_means"]), ("learned_mu", params["latent"]["mu"])):
        x = np.asarray(decode(params, jnp.asarray(z)))
        xc = jnp.clip(jnp.asarray(x), 0.0, 1.0)
        p_oracle = np.asarray(jax.nn.softmax(oracle_fn(oracle_vars, xc), -1))
        report[name] = {
            "flow_class": np.asarray(jnp.argmax(flow_logits(params, xc), -1)).tolist(),
            "oracle_class": p_oracle.argmax(-1).tolist(),
            "oracle_p_own_class": np.round(p_oracle[classes, classes], 3).tolist(),
            "oracle_agreement": float(np.mean(p_oracle.argmax(-1) == classes)),
            "pixel_max": float(x.max()),
        }
        images[name] = x
    test = load_dataset(data, "test")
    z = np.asarray(encode(params, jnp.asarray(test.images[:500]))).reshape(500, -1)
    m = np.asarray(params["class_means"]).reshape(config.num_classes, -1)
    d_own = np.linalg.norm(z - m[test.labels[:500]], axis=1)
    pair = [np.linalg.norm(m[i] - m[j]) for i in range(len(m)) for j in range(i)]
    report["mean_distance_test_latent_to_own_class_mean"] = float(d_own.mean())
    report["mean_distance_between_class_means"] = float(np.mean(pair))
    report["latent_dim"] = int(z.shape[1])
    report["texture"] = texture_sweep(params, config, test.images[:500], test.labels[:500])
    return report, images


def texture_sweep(params, config, x: np.ndarray, y: np.ndarray) -> dict:
    """Stroke texture (cfjax.metrics: grey share, Laplacian energy, lone pixels) of decodes of: the
    queries' own latents (reconstruction), the next class's mean latent m_t alone, and
    m_t + s * (z - m_y) for s = 1, 0.5, 0.25 (the ECINN move at alpha = 1 with the query's residual
    scaled): where in the move does the speckle appear? Decodes clipped and quantised to 8 bits."""
    from cfjax import metrics as M
    from cfjax.models import flow_classifier as fc

    enc = jax.jit(lambda x: fc.encode(params, config, x)[0])
    dec = jax.jit(lambda z: jnp.round(jnp.clip(fc.decode(params, config, z), 0.0, 1.0) * 255.0) / 255.0)
    z = enc(jnp.asarray(x))
    m = params["class_means"]
    t = (y + 1) % config.num_classes
    r = z - m[y]

    def tex(a):
        return {k: round(float(v), 4) for k, v in M.stroke_texture(a).items()}

    out = {"queries": tex(x), "reconstruction": tex(dec(z)), "target_mean_alone": tex(dec(m[t]))}
    for s in (1.0, 0.5, 0.25):
        out[f"target_mean_plus_{s:g}_residual"] = tex(dec(m[t] + s * r))
    return out


def plot(report: dict, images: dict, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(images)
    n = images[rows[0]].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.45 * len(rows) + 0.3))
    for r, name in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.clip(images[name][c, ..., 0], 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{c}: oracle {report[name]['oracle_class'][c]}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=7)
    fig.suptitle(f"decoded class means of {Path(report['flow']).name} (title: class, oracle's reading)", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from cfjax.pretrained import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--flow", default=None, help="flow model directory (default: the shipped mnist5k flow)")
    p.add_argument("--out", default="docs/figures/flow_class_means.png")
    p.add_argument("--json", default=None, help="also write the report here")
    a = p.parse_args(argv)
    report, images = diagnose(a.flow or default_model_dir("flow", "mnist5k"))
    plot(report, images, a.out)
    text = json.dumps(report, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
