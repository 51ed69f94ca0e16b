"""Explain your own models with cfjax's public API: your Flax classifier with DISC, your flow with ECINN.

    python examples/own_models.py [--steps 300] [--flow-steps 300] [--queries 16]

Nothing here uses cfjax's trainers or shipped weights: the classifier is an ordinary Flax module
with BatchNorm written below and trained with a plain Optax loop, the flow is built from
``cfjax.glow`` / ``cfjax.latent`` configs and trained with ``cfjax.flow_classifier.loss_fn``.
Only public names are used (``cfjax.__all__``): ``cfjax.data``, ``cfjax.disc``, ``cfjax.ecinn``,
``cfjax.flow_classifier``, ``cfjax.glow``, ``cfjax.latent``, ``cfjax.Explainer``.
Prints one line per model: accuracy, and the counterfactuals' validity under the model.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cfjax


class MyCNN(nn.Module):
    """A user's classifier: two conv-BN-ReLU blocks and a dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (16, 32):
            x = nn.Conv(width, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def batches(data, batch_size: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, len(data.images), batch_size)
        yield jnp.asarray(data.images[i]), jnp.asarray(data.labels[i])


def train_classifier(train, steps: int, seed: int = 0):
    model = MyCNN()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))
    opt = optax.adam(1e-3)
    state = opt.init(variables["params"])

    @jax.jit
    def step(params, stats, state, x, y):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), stats, state

    params, stats = variables["params"], variables["batch_stats"]
    for x, y in batches(train, 64, steps, seed):
        params, stats, state = step(params, stats, state, x, y)
    return model.apply, {"params": params, "batch_stats": stats}


def train_flow(train, steps: int, seed: int = 0):
    config = cfjax.flow_classifier.FlowClassifierConfig(
        glow=cfjax.glow.GlowConfig(num_levels=2, steps_per_level=2, hidden_channels=16),
        latent=cfjax.latent.LatentConfig(num_classes=10, beta=8.0))
    key = jax.random.PRNGKey(seed)
    params = cfjax.flow_classifier.init_flow_classifier(key, config, jnp.asarray(train.images[:64]))
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y, k):
        (_, aux), g = jax.value_and_grad(cfjax.flow_classifier.loss_fn, has_aux=True)(params, config, x, y, k)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for i, (x, y) in enumerate(batches(train, 64, steps, seed)):
        params, state = step(params, state, x, y, jax.random.fold_in(key, i))
    # ECINN's directions: the mean latent of the training images the model predicts as each class.
    encode = jax.jit(cfjax.flow_classifier.encode, static_argnums=1)
    logits = jax.jit(cfjax.flow_classifier.class_logits, static_argnums=1)
    sums, counts = 0.0, 0.0
    for i in range(0, len(train.images), 500):
        xb = jnp.asarray(train.images[i : i + 500])
        s, n = cfjax.ecinn.class_mean_sums(encode(params, config, xb)[0], jnp.argmax(logits(params, config, xb), -1), 10)
        sums, counts = sums + s, counts + n
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    params["class_means"] = jnp.where((counts > 0)[:, None], means, params["latent"]["mu"])
    return params, config


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="classifier training steps (batch 64)")
    p.add_argument("--flow-steps", type=int, default=300, help="flow training steps (batch 64)")
    p.add_argument("--disc-steps", type=int, default=120, help="DISC optimisation steps")
    p.add_argument("--queries", type=int, default=16)
    args = p.parse_args(argv)
    train, test = cfjax.data.load_dataset("mnist5k", "train"), cfjax.data.load_dataset("mnist5k", "test")
    x = test.images[: args.queries]
    out = {}

    apply_fn, variables = train_classifier(train, args.steps)
    pred = np.argmax(np.asarray(jax.jit(apply_fn)(variables, jnp.asarray(test.images))), -1)
    targets = (pred[: args.queries] + 1) % 10
    # a quick run: pixels prior, few steps, no jitter (the default jitter 2 pays off over the default 300 steps)
    cfg = cfjax.disc.DISCConfig(prior="pixels", steps=args.disc_steps, fit_steps=0, stages=(0.5, 0.9), jitter=0)
    d = cfjax.disc.generate(apply_fn, variables, x, targets, cfg)
    out["disc"] = {"accuracy": float(np.mean(pred == test.labels)),
                   "validity": float(np.mean(np.asarray(d["y_cf_pred"]) == targets))}

    params, config = train_flow(train, args.flow_steps)
    ex = cfjax.Explainer(params, config)
    e = ex.explain(x, target="next")
    out["ecinn"] = {"accuracy": float(np.mean(ex.predict(test.images) == test.labels)),
                    "validity": float(np.mean(e["y_cf_pred"] == e["y_target"]))}
    for name, r in out.items():
        print(f"{name}: model accuracy {r['accuracy']:.3f}, counterfactual validity {r['validity']:.3f}")
    return out


if __name__ == "__main__":
    main()
