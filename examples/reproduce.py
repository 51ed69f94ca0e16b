"""Reproduction report: every number in docs/results.md, measured by this one command.

    python examples/reproduce.py --out docs [--quick] [--work runs/reproduce] [--data-dir DIR]
                                 [--sections all|name,name] [--strict]

Sections (each measured here, on this machine, by this run):

- ``classifier``: the ECINN generative classifier (the flow) and the DISC models on mnist5k:
  test accuracy and bits/dim, next to the IB-INN paper's reported MNIST accuracy.
- ``ecinn``: ECINN step rules (paper / code / short / full, with and without refinement):
  validity, oracle agreement, realism (bits/dim, nearest-real distance, PCA error), proximity,
  time per counterfactual (compile excluded), next to the authors' published numbers.
- ``heatmaps``: ECINNh deletion / insertion AUC against gradient, gradient x input, integrated
  gradients and a random heatmap.
- ``disc``: a DISC ablation at a modest size (examples/disc_ablation.py's variants) plus the
  cfjax evaluate metrics of the default DISC, on the same queries as ECINN.
- ``boundary``: the decision-boundary experiment (cfjax.pipelines.boundary) for ECINN and DISC.
- ``fakemnist``: FakeMNIST ground truth: small models trained with the project's own commands
  (reused from --work when already there), both methods, marker mass of each counterfactual's
  change and of each heatmap.
- ``extra``: fashion_mnist / cifar10 when --data-dir holds a prepared tensorflow-datasets copy
  (they are trained with `cfjax train flow` and explained); otherwise reported as not run, with the
  reason (``--strict`` makes that an error: exit 2).

The models default to the shipped ones (cfjax/pretrained/mnist5k_*); pass --flow / --classifier /
--oracle / --duq to report on others (the script reads everything from the model directories).
Writes OUT/results.md, OUT/results.json and OUT/figures/*.png. ``--quick`` is a smoke run (tiny
sizes, tiny FakeMNIST models): its numbers are not meant to be read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's cfjax, even when another copy is installed

from cfjax import metrics as M  # noqa: E402
from cfjax.data import load_dataset  # noqa: E402
from cfjax.errors import CfjaxError  # noqa: E402
from cfjax.pretrained import PRETRAINED_DIR  # noqa: E402

SECTIONS = ("classifier", "ecinn", "heatmaps", "disc", "boundary", "fakemnist", "extra")

# What the papers (as read in /work/shared/papers/) report. Nothing else is claimed for them here.
PAPER = {
    "ibinn_mnist_accuracy": "about 99% (IB-INN, NeurIPS 2020, as summarised in our notes)",
    "ecinn_mnist_validity": 0.9997,
    "ecinn_mnist_oracle": 0.931,
    "ecinn_mnist_fid": 90.7,
    "ecinn_fake_validity": 1.0,
    "ecinn_fake_oracle": 1.0,
}

FULL = dict(n_ecinn=300, n_heat=100, n_disc=32, disc_variants=("pixels", "+inr", "+inr+duq", "+inr+duq+prog"), disc_steps=None,
            n_bound=500, n_bound_test=1000, n_bound_disc=64, bound_seeds=3, bound_steps=500, n_fake=200, n_fake_disc=32,
            fake_flow=["--arch", "ibinn-small", "--blocks", "2", "--steps", "400"], fake_clf=["--epochs", "8"], fake_duq=["--epochs", "6"], extra_epochs=10, n_extra=300)
QUICK = dict(n_ecinn=16, n_heat=8, n_disc=4, disc_variants=("pixels", "+inr+duq+prog"), disc_steps=12,
             n_bound=32, n_bound_test=100, n_bound_disc=4, bound_seeds=1, bound_steps=50, n_fake=16, n_fake_disc=4,
             fake_flow=["--epochs", "1", "--steps-per-level", "1", "--hidden", "8"], fake_clf=["--epochs", "1", "--width", "8", "--hidden", "16"],
             fake_duq=None, extra_epochs=1, n_extra=16)

# (step rule, refinement rounds) rows of section 2; the CLI default (explain_ecinn.DEFAULT_STEP /
# DEFAULT_REFINE) is added when missing and marked in the table.
STEP_RULES = [("paper", 0), ("code", 0), ("short", 0), ("full", 0), ("code", 2), ("short", 2), ("full", 2), ("beyond", 2)]
JUDGES = ("rbf", "knn")


def cli_default() -> tuple[str, int]:
    from cfjax.pipelines.explain_ecinn import DEFAULT_REFINE, DEFAULT_STEP

    return DEFAULT_STEP, DEFAULT_REFINE


def step_rule_rows() -> list[tuple[str, int]]:
    return STEP_RULES + ([cli_default()] if cli_default() not in STEP_RULES else [])


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mean(v) -> float:
    return float(np.mean(np.asarray(v, np.float64)))


# --------------------------------------------------------------------------------------------
# shared helpers


class Ctx:
    """Models, data and settings shared by the sections."""

    def __init__(self, args):
        self.args = args
        self.cfg = QUICK if args.quick else FULL
        self.out = Path(args.out)
        self.fig = self.out / "figures"
        self.work = Path(args.work)
        self.flow_dir = Path(args.flow or PRETRAINED_DIR / "mnist5k_flow")
        self.clf_dir = Path(args.classifier or PRETRAINED_DIR / "mnist5k_classifier")
        self.oracle_dir = Path(args.oracle or PRETRAINED_DIR / "mnist5k_oracle")
        self.duq_dir = Path(args.duq or PRETRAINED_DIR / "mnist5k_duq")
        self._flow = None

    def _load_flow(self):
        if self._flow is None:
            from cfjax.pipelines.train_flow import load_flow

            self._flow = load_flow(self.flow_dir)
        return self._flow

    params = property(lambda self: self._load_flow()[0])
    config = property(lambda self: self._load_flow()[1])
    flow_info = property(lambda self: self._load_flow()[2])
    train = property(lambda self: load_dataset("mnist5k", "train"))
    test = property(lambda self: load_dataset("mnist5k", "test"))

    def flow_logits(self, params=None, config=None):
        from cfjax.models import flow_classifier as fc

        p, c = (params, config) if params is not None else (self.params, self.config)
        return lambda x: fc.class_logits(p, c, x)


def evaluate_arrays(data: dict, name: str, data_name: str | None, oracle, flow, model="none", heatmap_limit: int = 0, batch_size: int = 128) -> dict:
    """`cfjax evaluate`'s metrics for in-memory arrays (the same code path as the command)."""
    from cfjax.pipelines.evaluate import _check_contents, evaluate

    data = {k: np.asarray(v) for k, v in data.items()}
    _check_contents(data, name)
    res, notes = evaluate(data, name, data_name, None, str(oracle) if oracle else "none", str(flow) if flow else "none",
                          str(model) if model else "none", heatmap_limit=heatmap_limit, batch_size=batch_size)
    res["skipped"] = notes
    return res


def time_ecinn(params, config, x, step, refine, batch_size: int = 256) -> tuple[dict, float]:
    """ECINN over x (compile first, then a timed run). Returns (outputs, seconds per counterfactual)."""
    from cfjax.pipelines.explain_ecinn import explain_arrays

    explain_arrays(params, config, x[: min(len(x), batch_size)], "next", step, batch_size=batch_size, refine=refine)  # compile
    t0 = time.perf_counter()
    res = explain_arrays(params, config, x, "next", step, batch_size=batch_size, refine=refine)
    return res, (time.perf_counter() - t0) / len(x)


def ecinn_data(x, y, res) -> dict:
    keys = ("x_cf", "y_pred", "y_target", "y_cf_pred", "heatmap")
    return {"x": x, "y": y, **{k: res[k] for k in keys}}


def _bar(path, labels, series: dict, ylabel: str, title: str, ylim=None):
    from cfjax.plotting import _mpl, save_figure

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.2))
    w = 0.8 / max(1, len(series))
    xs = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(xs + (i - (len(series) - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# sections


def flow_description(config, info: dict) -> str:
    """One phrase naming a flow's network, training data and schedule, from its saved config and info."""
    g = config.glow
    if getattr(g, "arch", "glow") == "ibinn":
        net = f"an IB-INN network ({g.blocks_high} + {g.blocks_low} all-in-one blocks{' + dense coupling' if g.dense else ''})"
    else:
        net = f"a {getattr(g, 'levels', '?')}-level Glow"
    ts = info.get("train_settings", {})
    steps, batch, epochs = ts.get("steps"), ts.get("batch_size"), ts.get("epochs")
    data = info.get("dataset", "?")
    if steps and batch and epochs:
        data += f" (about {round(steps * batch / epochs, -2):,.0f} images)"
    sched = f" for {steps:,} steps of {batch}" if steps and batch else ""
    return f"{net} trained on {data}{sched}, beta = {config.latent.beta}"


def section_classifier(ctx: Ctx) -> dict:
    from cfjax.models import flow_classifier as fc
    from cfjax.pipelines.train_classifier import evaluate_classifier, load_classifier
    from cfjax.pipelines.train_flow import evaluate_flow

    log("classifier: flow accuracy and bits/dim on mnist5k test")
    ev = evaluate_flow(ctx.params, ctx.config, ctx.test)
    pred = np.concatenate([np.asarray(jnp.argmax(jax.jit(fc.class_logits, static_argnums=1)(ctx.params, ctx.config, jnp.asarray(ctx.test.images[i : i + 500])), -1))
                           for i in range(0, len(ctx.test), 500)])
    out = {"flow": {"dir": str(ctx.flow_dir), "test_accuracy_dequantised": ev["test_accuracy"], "test_accuracy_clean": _mean(pred == ctx.test.labels),
                    "test_bits_per_dim": ev["test_bits_per_dim"], "n_test": len(ctx.test),
                    "beta": ctx.config.latent.beta, "train_settings": ctx.flow_info.get("train_settings", {}),
                    "description": flow_description(ctx.config, ctx.flow_info)}}
    for name, d in (("classifier", ctx.clf_dir), ("oracle", ctx.oracle_dir)):
        apply_fn, variables, cconfig, info = load_classifier(d)
        m = evaluate_classifier(variables, cconfig, ctx.test)
        out[name] = {"dir": str(d), "arch": cconfig.arch, "test_accuracy": m["test_accuracy"]}
    return out


def section_ecinn(ctx: Ctx) -> dict:
    from cfjax.metrics import stroke_texture
    from cfjax.pipelines.evaluate import judge_metrics
    from cfjax.plotting import save_counterfactual_grid

    n = ctx.cfg["n_ecinn"]
    q = ctx.test.take(n)
    rows = []
    for step, refine in step_rule_rows():
        log(f"ecinn: step {step}, refine {refine} on {n} queries")
        res, spc = time_ecinn(ctx.params, ctx.config, q.images, step, refine)
        data = ecinn_data(q.images, q.labels, res)
        ev = evaluate_arrays(data, f"ecinn-{step}-{refine}", "mnist5k", ctx.oracle_dir, ctx.flow_dir)
        ev.update(judge_metrics(data, "mnist5k", None, JUDGES))
        ev.update({k: _mean(v) for k, v in stroke_texture(res["x_cf"]).items()})
        ev.update(step=step, refine=refine, seconds_per_cf_compiled=spc, latent_crossing=_mean(res["alpha"] >= res["alpha0"]),
                  cli_default=(step, refine) == cli_default())
        rows.append(ev)
        if ev["cli_default"]:
            save_counterfactual_grid(ctx.fig / "ecinn_mnist5k_grid.png", q.images[:12], res["x_cf"][:12], res["y_pred"][:12],
                                     res["y_target"][:12], res["y_cf_pred"][:12], heatmap=res["heatmap"][:12],
                                     title=f"ECINN (CLI default: step {step}, {refine} refinement rounds) on mnist5k test: validity {ev['validity']:.1%}")
    labels = [f"{r['step']}/r{r['refine']}" for r in rows]
    _bar(ctx.fig / "ecinn_step_rules.png", labels, {"validity": [r["validity"] for r in rows], "oracle agreement": [r["oracle_agreement"] for r in rows],
                                                    **{f"{k.upper()} judge": [r[f"judge_{k}"] for r in rows] for k in JUDGES}},
         "fraction", f"ECINN step rules, mnist5k test ({n} queries, target = next class)", (0, 1.05))
    return {"n": n, "rows": rows, "texture_query": {k: _mean(v) for k, v in stroke_texture(q.images).items()}}


def section_heatmaps(ctx: Ctx) -> dict:
    from cfjax.pipelines.explain_ecinn import explain_arrays

    n = ctx.cfg["n_heat"]
    q = ctx.test.take(n)
    log(f"heatmaps: deletion/insertion on {n} queries")
    res = explain_arrays(ctx.params, ctx.config, q.images, "next")
    ev = evaluate_arrays(ecinn_data(q.images, q.labels, res), "ecinn-heatmaps", None, None, None, model=ctx.flow_dir, heatmap_limit=n)
    names = [("ECINNh", ""), ("gradient", "_gradient"), ("gradient x input", "_gradient_x_input"),
             ("integrated gradients", "_integrated_gradients"), ("random", "_random")]
    rows = [{"heatmap": a, "deletion_auc": ev[f"deletion_auc{b}"], "insertion_auc": ev[f"insertion_auc{b}"]} for a, b in names]
    _bar(ctx.fig / "heatmaps_deletion_insertion.png", [r["heatmap"] for r in rows],
         {"deletion AUC (lower better)": [r["deletion_auc"] for r in rows], "insertion AUC (higher better)": [r["insertion_auc"] for r in rows]},
         "AUC of p(predicted class)", f"Heatmaps for the mnist5k flow ({n} test queries)", (0, 1.0))
    return {"n": n, "rows": rows}


def _disc_context(ctx: Ctx, duq_dir, clf_dir, oracle_fn=None):
    from cfjax.pipelines.explain_disc import duq_from_dir
    from cfjax.pipelines.train_classifier import load_classifier

    apply_fn, variables, cconfig, _ = load_classifier(clf_dir)
    duq = duq_from_dir(duq_dir) if duq_dir is not None else None
    return apply_fn, variables, duq


def _disc_config(ctx: Ctx, **overrides):
    from cfjax.methods.disc import DISCConfig

    cfg = DISCConfig(**overrides) if overrides else DISCConfig()
    if ctx.cfg["disc_steps"]:
        cfg = cfg.replace(steps=ctx.cfg["disc_steps"], fit_steps=min(cfg.fit_steps, ctx.cfg["disc_steps"]))
    return cfg


def section_disc(ctx: Ctx) -> dict:
    import disc_ablation as ab
    from cfjax.pipelines.explain_disc import explain_arrays, predict_proba_batched

    n = ctx.cfg["n_disc"]
    q = ctx.test.take(n)
    apply_fn, variables, duq = _disc_context(ctx, ctx.duq_dir, ctx.clf_dir)
    y_pred = np.argmax(predict_proba_batched(apply_fn, variables, q.images), -1)
    targets = ((y_pred + 1) % 10).astype(np.int32)
    rows, images = [], {}
    for name in ctx.cfg["disc_variants"]:
        overrides, use_duq, desc = ab.VARIANTS[name]
        cfg = _disc_config(ctx, **overrides)
        if not use_duq:
            cfg = cfg.replace(lambda_mc=0.0)
        log(f"disc: variant {name} on {n} queries")
        t0 = time.perf_counter()
        res = explain_arrays(apply_fn, variables, q.images, targets, cfg, duq if use_duq else None, batch_size=256)
        secs = (time.perf_counter() - t0) / n
        data = {"x": q.images, "y": q.labels, **{k: res[k] for k in ("x_cf", "y_pred", "y_target", "y_cf_pred")}}
        ev = evaluate_arrays(data, f"disc-{name}", "mnist5k", ctx.oracle_dir, ctx.flow_dir)
        ev.update(variant=name, description=desc, seconds_per_cf_incl_compile=secs, default=(name == ab.DEFAULT_ROW))
        rows.append(ev)
        images[name] = res["x_cf"]
    ab._figure(ctx.fig / "disc_ablation.png", q.images, targets, images, min(6, n))
    return {"n": n, "rows": rows, "steps": _disc_config(ctx).steps}


def section_boundary(ctx: Ctx) -> dict:
    from cfjax.pipelines import boundary as B
    from cfjax.pipelines.explain_disc import explain_arrays as disc_explain
    from cfjax.pipelines.explain_ecinn import explain_arrays

    c = ctx.cfg
    rng = np.random.default_rng(0)
    test_x = ctx.test.images[: c["n_bound_test"]]
    out = {}
    # ECINN explains the flow
    q = ctx.train.images[rng.permutation(len(ctx.train))[: c["n_bound"]]]
    logits = ctx.flow_logits()
    y_pred = np.asarray(jnp.argmax(jax.jit(logits)(jnp.asarray(q)), -1))
    targets = ((y_pred + rng.integers(1, 10, len(q))) % 10).astype(np.int32)
    log(f"boundary: ECINN counterfactuals for {len(q)} train queries")
    res = explain_arrays(ctx.params, ctx.config, q, targets)
    log("boundary: surrogates for ECINN / the flow")
    out["ecinn"] = B.run_experiment(logits, q, res["x_cf"], targets, test_x, seeds=c["bound_seeds"], steps=c["bound_steps"])
    out["ecinn"]["validity"] = _mean(res["y_cf_pred"] == targets)
    # DISC explains the CNN
    apply_fn, variables, duq = _disc_context(ctx, ctx.duq_dir, ctx.clf_dir)
    qd = ctx.train.images[rng.permutation(len(ctx.train))[: c["n_bound_disc"]]]
    clogits = lambda x: apply_fn(variables, x)  # noqa: E731
    yd = np.asarray(jnp.argmax(jax.jit(clogits)(jnp.asarray(qd)), -1))
    td = ((yd + rng.integers(1, 10, len(qd))) % 10).astype(np.int32)
    log(f"boundary: DISC counterfactuals for {len(qd)} train queries")
    resd = disc_explain(apply_fn, variables, qd, td, _disc_config(ctx), duq)
    log("boundary: surrogates for DISC / the CNN")
    out["disc"] = B.run_experiment(clogits, qd, resd["x_cf"], td, test_x, seeds=c["bound_seeds"], steps=c["bound_steps"])
    out["disc"]["validity"] = _mean(resd["y_cf_pred"] == td)
    for m in ("ecinn", "disc"):
        rows = [r for r in out[m]["rows"] if r["surrogate"] == "mlp"]
        sets = list(dict.fromkeys(r["set"] for r in rows))
        series = {s: [next(r["agreement_mean"] for r in rows if r["set"] == s and r["corruption"] == cc) for cc in B.CORRUPTIONS] for s in sets}
        _bar(ctx.fig / f"boundary_{m}.png", list(B.CORRUPTIONS), series, "agreement with the model",
             f"MLP surrogate agreement with the model {m.upper()} explains, held-out mnist5k test", (0, 1.0))
    return out


def _ensure_model(ctx: Ctx, kind: str, name: str, extra: list[str], data: str = "fakemnist5k") -> tuple[Path, str, bool]:
    from cfjax.cli import main as cli

    d = ctx.work / name
    cmd = ["train", kind, "--data", data, "--out", str(d), "--seed", "0", "--quiet", *extra]
    if ctx.args.data_dir and data not in ("mnist5k", "fakemnist5k"):
        cmd += ["--data-dir", ctx.args.data_dir]
    shown = "cfjax " + " ".join(cmd)
    if (d / "cfjax_model.json").exists() and json.loads((d / "cfjax_model.json").read_text()).get("status") == "complete":
        log(f"reusing {d} (trained by: {shown})")
        return d, shown, True
    log(f"training: {shown}")
    ctx.work.mkdir(parents=True, exist_ok=True)
    code = cli(cmd)
    if code != 0:
        raise CfjaxError(f"training {name} failed (exit {code}): {shown}")
    return d, shown, False


def _marker_stats(x, x_cf, y_src, y_tgt) -> dict:
    """Does x_cf switch the FakeMNIST markers: source marker off (< 0.5) and target marker on (> 0.5)?"""
    i = np.arange(len(x))
    on = x_cf[i, y_tgt, 0, 0] > 0.5
    off = x_cf[i, y_src, 0, 0] < 0.5
    return {"marker_switched": _mean(on & off), "marker_value_source": _mean(x_cf[i, y_src, 0, 0]),
            "marker_value_target": _mean(x_cf[i, y_tgt, 0, 0])}


def _top2_on_markers(h, y_src, y_tgt) -> float:
    flat = np.asarray(h).reshape(len(h), -1)
    w = h.shape[2]
    top = np.argsort(-flat, 1)[:, :2]
    want = np.stack([y_src * w, y_tgt * w], 1)
    return _mean([set(a) == set(b) for a, b in zip(top.tolist(), want.tolist())])


def section_fakemnist(ctx: Ctx) -> dict:
    from cfjax.pipelines.explain_disc import explain_arrays as disc_explain, predict_proba_batched
    from cfjax.pipelines.explain_ecinn import explain_arrays
    from cfjax.pipelines.train_classifier import load_classifier
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.plotting import save_counterfactual_grid

    c = ctx.cfg
    flow_dir, flow_cmd, flow_reused = _ensure_model(ctx, "flow", "fake_flow", c["fake_flow"])
    clf_dir, clf_cmd, clf_reused = _ensure_model(ctx, "classifier", "fake_clf", ["--arch", "cnn", "--augment-shift", "0", *c["fake_clf"]])
    duq = None
    duq_cmd = None
    if c["fake_duq"] is not None:
        duq_dir, duq_cmd, _ = _ensure_model(ctx, "duq", "fake_duq", c["fake_duq"])
    out = {"commands": {"flow": flow_cmd, "classifier": clf_cmd, "duq": duq_cmd}, "reused": {"flow": flow_reused, "classifier": clf_reused}}
    test = load_dataset("fakemnist5k", "test")
    q = test.take(c["n_fake"])
    params, config, finfo = load_flow(flow_dir)
    apply_fn, variables, cconfig, cinfo = load_classifier(clf_dir)
    out["flow_metrics"] = finfo.get("metrics", {})
    out["classifier_metrics"] = cinfo.get("metrics", {})

    log(f"fakemnist: ECINN on {len(q)} queries")
    res = explain_arrays(params, config, q.images, "next")
    ev = evaluate_arrays(ecinn_data(q.images, q.labels, res), "fake-ecinn", "fakemnist5k", clf_dir, flow_dir, model=flow_dir, heatmap_limit=min(64, len(q)))
    ev.update(_marker_stats(q.images, res["x_cf"], res["y_pred"], res["y_target"]))
    ev["heatmap_top2_on_markers"] = _top2_on_markers(res["heatmap"], res["y_pred"], res["y_target"])
    # gradient heatmaps of the same model, same marker-mass metric
    logits = lambda x: __import__("cfjax.models.flow_classifier", fromlist=["x"]).class_logits(params, config, x)  # noqa: E731
    hm = {}
    xs, cls = jnp.asarray(q.images[:64]), jnp.asarray(res["y_pred"][:64])
    hm["gradient"] = np.asarray(jax.jit(lambda a, b: M.gradient_saliency(logits, a, b))(xs, cls))
    hm["integrated gradients"] = np.abs(np.asarray(jax.jit(lambda a, b: jnp.sum(M.integrated_gradients(logits, a, b, 32), -1))(xs, cls)))
    pair = np.stack([res["y_pred"][:64], res["y_target"][:64]], 1).astype(np.int32)
    ev["marker_mass_gradient"] = _mean(M.marker_mass(hm["gradient"], pair, reduce=False))
    ev["marker_mass_integrated_gradients"] = _mean(M.marker_mass(hm["integrated gradients"], pair, reduce=False))
    out["ecinn"] = ev
    save_counterfactual_grid(ctx.fig / "fakemnist_ecinn.png", q.images[:8], res["x_cf"][:8], res["y_pred"][:8], res["y_target"][:8],
                             res["y_cf_pred"][:8], heatmap=res["heatmap"][:8], title="ECINN on FakeMNIST (marker: row = class, column 0)")

    log(f"fakemnist: DISC on {c['n_fake_disc']} queries")
    qd = test.take(c["n_fake_disc"])
    if duq_cmd is not None:
        from cfjax.pipelines.explain_disc import duq_from_dir

        duq = duq_from_dir(duq_dir)
    cfg = _disc_config(ctx)
    if duq is None:
        cfg = cfg.replace(lambda_mc=0.0)
    yp = np.argmax(predict_proba_batched(apply_fn, variables, qd.images), -1).astype(np.int32)
    td = ((yp + 1) % 10).astype(np.int32)
    resd = disc_explain(apply_fn, variables, qd.images, td, cfg, duq)
    data = {"x": qd.images, "y": qd.labels, **{k: resd[k] for k in ("x_cf", "y_pred", "y_target", "y_cf_pred")}}
    evd = evaluate_arrays(data, "fake-disc", "fakemnist5k", flow_dir, flow_dir)
    evd.update(_marker_stats(qd.images, resd["x_cf"], resd["y_pred"], resd["y_target"]))
    clogits = lambda x: apply_fn(variables, x)  # noqa: E731
    xs, cls = jnp.asarray(qd.images), jnp.asarray(resd["y_pred"])
    pair = np.stack([resd["y_pred"], resd["y_target"]], 1).astype(np.int32)
    g = np.asarray(jax.jit(lambda a, b: M.gradient_saliency(clogits, a, b))(xs, cls))
    ig = np.abs(np.asarray(jax.jit(lambda a, b: jnp.sum(M.integrated_gradients(clogits, a, b, 32), -1))(xs, cls)))
    evd["marker_mass_gradient"] = _mean(M.marker_mass(g, pair, reduce=False))
    evd["marker_mass_integrated_gradients"] = _mean(M.marker_mass(ig, pair, reduce=False))
    evd["manifold"] = "duq" if duq is not None else "none"
    out["disc"] = evd
    save_counterfactual_grid(ctx.fig / "fakemnist_disc.png", qd.images[:8], resd["x_cf"][:8], resd["y_pred"][:8], resd["y_target"][:8],
                             resd["y_cf_pred"][:8], title="DISC on FakeMNIST")
    return out


def section_extra(ctx: Ctx) -> dict:
    from cfjax.pipelines.train_flow import evaluate_flow, load_flow

    out = {}
    for name in [s for s in ctx.args.extra_datasets.split(",") if s]:
        try:
            load_dataset(name, "train", ctx.args.data_dir)
            test = load_dataset(name, "test", ctx.args.data_dir)
        except CfjaxError as e:
            log(f"extra: {name} not run: {e}")
            out[name] = {"status": "not run", "reason": str(e)}
            if ctx.args.strict:
                raise CfjaxError(f"{name}: {e}") from None
            continue
        flow_dir, cmd, reused = _ensure_model(ctx, "flow", f"{name}_flow", ["--epochs", str(ctx.cfg["extra_epochs"])], data=name)
        params, config, _ = load_flow(flow_dir)
        ev = evaluate_flow(params, config, test)
        q = test.take(ctx.cfg["n_extra"])
        res, spc = time_ecinn(params, config, q.images, "short", 2)
        evx = evaluate_arrays(ecinn_data(q.images, q.labels, res), f"{name}-ecinn", name, None, flow_dir)
        out[name] = {"status": "run", "command": cmd, "reused": reused, **ev, "ecinn": {**evx, "seconds_per_cf_compiled": spc}}
    return out


# --------------------------------------------------------------------------------------------
# report


def _f(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def write_report(ctx: Ctx, R: dict, meta: dict) -> Path:
    L = ["# cfjax: reproduction report", "",
         f"Generated by `{meta['command']}` on {meta['machine']}, {meta['date']} (total {meta['seconds'] / 60:.1f} min).",
         "Every number below was measured by that run; the papers' numbers are quoted from the notes in",
         "`/work/shared/papers/` and marked as such. Re-run the command to regenerate this file and `figures/`.", ""]
    for r in meta.get("reruns", []):
        L += [f"Re-measured section(s) {', '.join(r['sections'])} by `{r['command']}` ({r['date']}, {r['seconds'] / 60:.1f} min); "
              "their numbers replace the first run's.", ""]
    if meta["quick"]:
        L += ["> **--quick smoke run**: tiny sizes and tiny models; the numbers are not meant to be read.", ""]
    L += [f"Models: flow `{meta['flow']}`, classifier `{meta['classifier']}`, oracle `{meta['oracle']}`, DUQ `{meta['duq']}`.", ""]

    if "classifier" in R:
        c = R["classifier"]
        fl = c["flow"]
        desc = fl.get("description") or f"trained on 4,000 images (mnist5k) with beta = {fl['beta']}"
        L += ["## 1. The generative classifier (mnist5k)", "",
              "| | ours (measured) | paper |", "|---|---|---|",
              f"| flow test accuracy, clean / dequantised inputs ({fl['n_test']} mnist5k test images) | {_pct(fl['test_accuracy_clean'])} / {_pct(fl['test_accuracy_dequantised'])} | IB-INN on MNIST: {PAPER['ibinn_mnist_accuracy']} |",
              f"| flow test bits/dim | {fl['test_bits_per_dim']:.2f} | not in our notes of the IB-INN paper |",
              f"| DISC's classifier ({c['classifier']['arch']}) test accuracy | {_pct(c['classifier']['test_accuracy'])} | |",
              f"| independent oracle ({c['oracle']['arch']}) test accuracy | {_pct(c['oracle']['test_accuracy'])} | |", "",
              f"The flow is {desc}, "
              "on a CPU; the IB-INN authors train 24 + 24 blocks on 59,000 MNIST images for 27,600 steps. That and the "
              "data size are why accuracy is below ~99% (README, \"The shipped flow\").", ""]

    if "ecinn" in R:
        e = R["ecinn"]
        judged = all(f"judge_{k}" in r for r in e["rows"] for k in JUDGES)
        is_default = [r.get("cli_default", (r["step"], r["refine"]) == ("short", 2)) for r in e["rows"]]
        L += ["## 2. ECINN counterfactuals (mnist5k test, target = next class)", "",
              f"{e['n']} test queries per rule. Validity: the flow predicts the target on x_cf. Oracle: the independent ResNet "
              "predicts the target."
              + (" RBF / k-NN: pixel-space judges of other model families, fit on mnist5k train, predict the target "
                 "(`cfjax evaluate --judges`)." if judged else "")
              + " Bits/dim: under the *same* flow (not independent). NN dist: L2 to the nearest training image "
              "of the target class (queries: to their own class). PCA err: residual off 50 principal components of the "
              "training images. l1: per-pixel mean |x_cf - x|."
              + (" Lone px: isolated ink pixels per image (texture, README)." if judged else "")
              + " ms/CF: wall time per counterfactual after compilation.", ""]
        judge_head = " RBF | k-NN | lone px |" if judged else ""
        L += ["| step rule | refine | validity | oracle agreement |" + judge_head + " latent crossing | bits/dim | NN dist | PCA err | l1/pixel | ms/CF |",
              "|---|---|---|---|" + ("---|---|---|" if judged else "") + "---|---|---|---|---|---|"]
        q = e["rows"][0]
        for r, default in zip(e["rows"], is_default):
            mark = " **(CLI default)**" if default else ""
            judge_cells = f" {_pct(r['judge_rbf'])} | {_pct(r['judge_knn'])} | {r['isolated_ink']:.2f} |" if judged else ""
            L.append(f"| {r['step']}{mark} | {r['refine']} | {_pct(r['validity'])} | {_pct(r['oracle_agreement'])} |{judge_cells} {_pct(r['latent_crossing'])} | "
                     f"{r['bits_per_dim']:.2f} | {r['nn_distance']:.2f} | {r['pca_error']:.2f} | {r['l1_per_pixel']:.3f} | {1000 * r['seconds_per_cf_compiled']:.1f} |")
        d = e["rows"][is_default.index(True)]
        p = next(r for r in e["rows"] if (r["step"], r["refine"]) == ("paper", 0))
        lone_q = e.get("texture_query", {}).get("isolated_ink")
        blank = f" | | {'' if lone_q is None else f'{lone_q:.2f}'} |" if judged else ""
        L += [f"| *queries themselves* | | | *oracle accuracy {_pct(q['oracle_accuracy_query'])}* |{blank} | {q['bits_per_dim_query']:.2f} | {q['nn_distance_query']:.2f} | {q['pca_error_query']:.2f} | | |", "",
              "Side by side with the authors' follow-up evaluation of ECINN on MNIST (from our notes):", "",
              "| | paper (MNIST, authors' model) | ours (mnist5k, CLI default) |", "|---|---|---|",
              f"| validity | {_pct2(PAPER['ecinn_mnist_validity'])} | {_pct(d['validity'])} (paper's rule, no refinement: {_pct(p['validity'])}) |",
              f"| oracle agreement | {_pct(PAPER['ecinn_mnist_oracle'])} | {_pct(d['oracle_agreement'])} (paper's rule: {_pct(p['oracle_agreement'])}) |",
              f"| FID | {PAPER['ecinn_mnist_fid']} | not measured (28x28 grey digits; we report NN distance, PCA error, bits/dim) |",
              f"| time per counterfactual | two network evaluations | {1000 * d['seconds_per_cf_compiled']:.1f} ms on this CPU |", ""]
        if judged:
            L += [f"**Reading.** With the CLI default ({d['step']}, {d['refine']} refinement rounds) the judges of other model families "
                  f"read {_pct(d['judge_rbf'])} / {_pct(d['judge_knn'])} of the counterfactuals as the target and the ResNet oracle "
                  f"{_pct(d['oracle_agreement'])}. The oracle is not a calibrated judge (README, \"Side by side with the authors\": "
                  "a CNN oracle reads the authors' gradient baseline, tiny adversarial-like changes, as the target); section 8 "
                  "compares cfjax with the authors' own counterfactuals under calibrated judges. Where we still fall short is "
                  f"texture: {d['isolated_ink']:.2f} isolated ink pixels per counterfactual here (README, texture table: the "
                  "authors' counterfactuals 0.12, real digits 0.07).", ""]
        else:
            L += ["**Where we fall short.** The counterfactuals are valid under the flow, but the independent oracle reads "
                  f"only {_pct(d['oracle_agreement'])} of them as the target (paper: {_pct(PAPER['ecinn_mnist_oracle'])}).", ""]
        L += ["![ECINN step rules](figures/ecinn_step_rules.png)", "", "![ECINN grid](figures/ecinn_mnist5k_grid.png)", ""]

    if "heatmaps" in R:
        h = R["heatmaps"]
        L += ["## 3. ECINNh heatmaps vs gradient baselines (mnist5k)", "",
              f"Deletion: pixels set to 0 in decreasing heatmap order, area under p(predicted class) (lower = better). "
              f"Insertion: pixels copied onto a black image (higher = better). {h['n']} test queries, 20 steps, the flow's "
              "predicted class; integrated gradients with 32 steps from a black baseline.", "",
              "| heatmap | deletion AUC | insertion AUC |", "|---|---|---|"]
        L += [f"| {r['heatmap']} | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} |" for r in h["rows"]]
        L += ["", "![heatmaps](figures/heatmaps_deletion_insertion.png)", ""]

    if "disc" in R:
        d = R["disc"]
        L += ["## 4. DISC ablation (mnist5k test, target = next class)", "",
              f"{d['n']} queries, {d['steps']} optimisation steps, the shipped CNN explained, metrics from `cfjax evaluate`'s code "
              "(oracle: the independent ResNet; bits/dim: under the shipped flow, a model DISC never sees). The full ablation "
              "with more variants is `examples/disc_ablation.py` (results in `examples/results/`). \"CLI default\" marks the "
              "defaults when this section was generated; the current defaults (DIP prior, jitter 2 and, for MNIST, the "
              "`strokes` style) and their judge panel are in the README (\"DISC: the ablation behind the defaults\").", "",
              "| variant | flip rate | oracle agreement | bits/dim | NN dist | PCA err | l1/pixel | s/CF (incl. compile) |",
              "|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            mark = " **(CLI default)**" if r["default"] else ""
            L.append(f"| {r['description']}{mark} | {_pct(r['validity'])} | {_pct(r['oracle_agreement'])} | {r['bits_per_dim']:.2f} | "
                     f"{r['nn_distance']:.2f} | {r['pca_error']:.2f} | {r['l1_per_pixel']:.3f} | {r['seconds_per_cf_incl_compile']:.2f} |")
        L += ["", "The DISC paper reports no numbers we could read (notes: abstract, introduction, figure caption); its claims "
              "are qualitative (realistic, discernible changes; better boundary learning; robustness to corruptions), "
              "which sections 4 and 5 test.", "", "![DISC ablation](figures/disc_ablation.png)", ""]

    if "boundary" in R:
        b = R["boundary"]
        L += ["## 5. Decision-boundary experiment", "",
              "Surrogates trained on the explained model's labels of N queries plus one perturbed image per query "
              "(counterfactual; random Gaussian direction with the counterfactual's L2 norm; targeted L2 PGD against the model "
              "towards the same target class with the same L2 budget; or no perturbation), then scored by agreement with the "
              "model on held-out mnist5k test images, clean and corrupted (Gaussian noise sigma 0.3, Gaussian blur sigma 1, "
              "contrast x0.4). Mean +- std over surrogate seeds (the linear surrogate starts from zeros and trains full-batch, so "
              "its seeds agree exactly). Flip: fraction of perturbed images whose model label differs from the query's. "
              "Agreement under a corruption compares with the model's own label of the corrupted image.", ""]
        for m, title in (("ecinn", "ECINN explaining the flow"), ("disc", "DISC explaining the CNN")):
            if m not in b:
                continue
            rows = b[m]["rows"]
            n_q = next(r["n_train"] for r in rows if r["set"] == "queries only")
            L += [f"### {title} ({n_q} train queries, counterfactual validity {_pct(b[m]['validity'])}, {b[m]['test_n']} test images)", "",
                  "| training set | surrogate | flip | mean L2 | " + " | ".join(sorted({r['corruption'] for r in rows}, key=["clean", "noise", "blur", "contrast"].index)) + " |",
                  "|---|---|---|---|---|---|---|---|"]
            cors = ["clean", "noise", "blur", "contrast"]
            for s in dict.fromkeys(r["set"] for r in rows):
                for k in dict.fromkeys(r["surrogate"] for r in rows):
                    cells = []
                    for cc in cors:
                        r = next((r for r in rows if r["set"] == s and r["surrogate"] == k and r["corruption"] == cc), None)
                        cells.append("" if r is None else f"{_pct(r['agreement_mean'])} +- {100 * r['agreement_std']:.1f}")
                    r0 = next(r for r in rows if r["set"] == s and r["surrogate"] == k)
                    L.append(f"| {s} | {k} | {_pct(r0['flip_rate'])} | {r0['mean_l2']:.2f} | " + " | ".join(cells) + " |")
            mlp = [r for r in rows if r["surrogate"] == "mlp"]
            reading = []
            for cc in cors:
                best = max((r for r in mlp if r["corruption"] == cc), key=lambda r: r["agreement_mean"], default=None)
                cf = next((r for r in mlp if r["corruption"] == cc and r["set"] == "counterfactual"), None)
                if best and cf:
                    reading.append(f"{cc}: best {best['set']} ({_pct(best['agreement_mean'])}), counterfactual {_pct(cf['agreement_mean'])}")
            L += ["", "MLP surrogate, per test condition: " + "; ".join(reading) + ".", "", f"![boundary {m}](figures/boundary_{m}.png)", ""]

    if "fakemnist" in R:
        f = R["fakemnist"]
        e, d = f["ecinn"], f["disc"]
        L += ["## 6. FakeMNIST: ground truth for explanations", "",
              "FakeMNIST (ECINN authors): labels redrawn at random, the pixel (row = label, column 0) set to 1. A model that "
              "learns the task reads only that pixel, so a correct explanation changes exactly the two marker pixels (the "
              "query's class off, the target's on). Models trained by these commands (reused from `--work` when present):", "",
              f"- `{f['commands']['flow']}` (test accuracy {_pct(f['flow_metrics'].get('test_accuracy'))})",
              f"- `{f['commands']['classifier']}` (test accuracy {_pct(f['classifier_metrics'].get('test_accuracy'))})"]
        if f["commands"]["duq"]:
            L.append(f"- `{f['commands']['duq']}`")
        L += ["", "Marker mass: share of |x_cf - x| (or of the heatmap) on the two marker pixels (1 = perfect). Marker switched: "
              "x_cf has the target's marker on (> 0.5) and the query's off (< 0.5). Oracle: the *other* FakeMNIST model "
              "(the CNN for ECINN, the flow for DISC).", "",
              "| | ECINN (flow) | DISC (CNN) | paper (ECINN) |", "|---|---|---|---|",
              f"| test queries | {ctx.cfg['n_fake']} (heatmap curves: first {e.get('heatmap_n', 0)}) | {ctx.cfg['n_fake_disc']} | |",
              f"| validity | {_pct(e['validity'])} | {_pct(d['validity'])} | {_pct(PAPER['ecinn_fake_validity'])} |",
              f"| oracle agreement | {_pct(e['oracle_agreement'])} | {_pct(d['oracle_agreement'])} | {_pct(PAPER['ecinn_fake_oracle'])} |",
              f"| marker switched | {_pct(e['marker_switched'])} | {_pct(d['marker_switched'])} | |",
              f"| x_cf at the query's / target's marker (x: 1 / 0) | {_f(e.get('marker_value_source'), '{:.2f}')} / {_f(e.get('marker_value_target'), '{:.2f}')} | {_f(d.get('marker_value_source'), '{:.2f}')} / {_f(d.get('marker_value_target'), '{:.2f}')} | |",
              f"| marker mass of the change x_cf - x | {e['marker_mass']:.3f} | {d['marker_mass']:.3f} | |",
              f"| marker mass of the ECINNh heatmap | {e.get('marker_mass_heatmap', float('nan')):.3f} | (no heatmap) | |",
              f"| ECINNh top-2 pixels = the two markers | {_pct(e['heatmap_top2_on_markers'])} | | |",
              f"| marker mass of gradient saliency | {e['marker_mass_gradient']:.3f} | {d['marker_mass_gradient']:.3f} | |",
              f"| marker mass of integrated gradients | {e['marker_mass_integrated_gradients']:.3f} | {d['marker_mass_integrated_gradients']:.3f} | |",
              f"| l1 per pixel | {e['l1_per_pixel']:.4f} | {d['l1_per_pixel']:.4f} | |", "",
              "![FakeMNIST ECINN](figures/fakemnist_ecinn.png)", "", "![FakeMNIST DISC](figures/fakemnist_disc.png)", ""]

    if "extra" in R:
        L += ["## 7. fashion_mnist and cifar10", ""]
        for name, r in R["extra"].items():
            if r["status"] == "run":
                ex = r["ecinn"]
                L.append(f"- **{name}**: `{r['command']}`: test accuracy {_pct(r['test_accuracy'])}, bits/dim {r['test_bits_per_dim']:.2f}; "
                         f"ECINN (CLI default) validity {_pct(ex['validity'])}, {1000 * ex['seconds_per_cf_compiled']:.1f} ms/CF.")
            else:
                L.append(f"- **{name}**: not run. {r['reason']}")
        L += ["", "This machine is offline and has no prepared tensorflow-datasets copy, so only mnist5k and FakeMNIST "
              "(both built from the digits shipped inside the package) are measured here. With a prepared copy, "
              "`python examples/reproduce.py --sections extra --data-dir DIR` trains a flow on each with `cfjax train flow` "
              "and reports the same measurements.", ""]
    L += reference_lines(R, meta)
    path = ctx.out / "results.md"
    path.write_text("\n".join(L) + "\n")
    return path


def _pct2(v) -> str:
    return f"{100 * v:.2f}%"


def _rate(cell) -> str:
    return "" if cell is None else f"{_pct(cell['rate'])} ({_pct(cell['ci95'][0])}–{_pct(cell['ci95'][1])})"


def reference_lines(R: dict, meta: dict) -> list[str]:
    """Sections 8-9: side by side with the ECINN authors' own counterfactuals (written into
    results.json by examples/ecinn_reference.py, which may postdate the run of sections 1-7)."""
    L = []
    ref = R.get("ecinn_reference")
    if ref:
        L += [f"## 8. Side by side with the ECINN authors ({ref['queries']})", "",
              f"`python examples/ecinn_reference.py --model {ref['model']}` (step {ref['step']}, refine {ref['refine']}, "
              f"{ref['seconds']:.0f} s on 2 shared CPU cores). Sections 1-7 above are from the run of {meta.get('date', '?')}; "
              "this section is the shipped model's. Judges: pixel-space RBF and k-NN classifiers trained on mnist5k train + "
              "MNIST test 0-4999. Rates with 95% Wilson intervals.", "",
              "| images | validity | RBF judge | k-NN judge | both | ElasticNet | IM1 | IM2 | Fréchet (PCA-50) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in ref["rows"].items():
            st = row.get("study", {})
            num = [f"{st[k].get('mean', st[k].get('value')):.3g}" if k in st else "" for k in ("elastic_net", "im1", "im2", "fid")]
            L.append(f"| {name} | {_rate(row.get('validity'))} | {_rate(row.get('judge_rbf'))} | {_rate(row.get('judge_knn'))} | "
                     f"{_rate(row.get('judges_all_agree'))} | " + " | ".join(num) + " |")
        for key, abl in ref.items():
            if key.startswith("ablation_"):
                for name, row in abl["rows"].items():
                    L.append(f"| {name}, {abl['model']} | {_rate(row.get('validity'))} | {_rate(row.get('judge_rbf'))} | "
                             f"{_rate(row.get('judge_knn'))} | {_rate(row.get('judges_all_agree'))} | | | | |")
        L += ["", "![side by side](figures/ecinn_side_by_side.png)", ""]
    fake = R.get("fakemnist_reference", {}).get("ecinn")
    if fake:
        L += ["## 9. FakeMNIST, the authors' test images", "",
              f"Flow: `{fake['model']}`; queries: {fake['queries']}. Marker switched (target's pixel on, query's off): "
              f"cfjax {_pct2(fake['marker_switched'])} (95% interval {_pct2(fake['marker_switched_ci95'][0])}–"
              f"{_pct2(fake['marker_switched_ci95'][1])}), the authors' counterfactuals {_pct2(fake['authors_gen_marker_switched'])}; "
              f"mean |x' − x| per pixel {fake['mean_abs_change']:.4f} (authors {fake['authors_gen_mean_abs_change']:.4f}).", ""]
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="directory for results.md, results.json and figures/ (default docs)")
    p.add_argument("--work", default="runs/reproduce", help="models this script trains (FakeMNIST, extra datasets); reused when present")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and models")
    p.add_argument("--sections", default="all", help=f"all, or a comma list of {', '.join(SECTIONS)}")
    p.add_argument("--data-dir", default=None, help="tensorflow-datasets directory with prepared fashion_mnist / cifar10")
    p.add_argument("--extra-datasets", default="fashion_mnist,cifar10")
    p.add_argument("--strict", action="store_true", help="an extra dataset that cannot be loaded is an error (exit 2)")
    p.add_argument("--flow", default=None, help="flow model directory (default: shipped mnist5k_flow)")
    p.add_argument("--classifier", default=None, help="DISC's classifier (default: shipped mnist5k_classifier)")
    p.add_argument("--oracle", default=None, help="independent oracle classifier (default: shipped mnist5k_oracle)")
    p.add_argument("--duq", default=None, help="DUQ model (default: shipped mnist5k_duq)")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/results.md from OUT/results.json of an earlier run (no measuring)")
    args = p.parse_args(argv)
    if args.render_only:
        src = Path(args.out) / "results.json"
        if not src.exists():
            print(f"reproduce: error: --render-only needs {src} from an earlier run", file=sys.stderr)
            return 2
        saved = json.loads(src.read_text())
        args.quick = saved["meta"]["quick"]
        path = write_report(Ctx(args), saved["results"], saved["meta"])
        log(f"report re-rendered from {src} -> {path}")
        return 0
    sections = list(SECTIONS) if args.sections == "all" else [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"reproduce: error: unknown section(s) {', '.join(bad)}: choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = Path(args.out)
        (out / "figures").mkdir(parents=True, exist_ok=True)
        ctx = Ctx(args)
        R = {}
        for s in sections:
            t = time.perf_counter()
            R[s] = globals()[f"section_{s}"](ctx)
            log(f"section {s} done in {time.perf_counter() - t:.0f}s")
        meta = {
            "command": "python examples/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()} CPU x{os.cpu_count()} (shared), jax {jax.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.perf_counter() - t0, "quick": args.quick,
            "flow": str(ctx.flow_dir.name), "classifier": ctx.clf_dir.name, "oracle": ctx.oracle_dir.name, "duq": ctx.duq_dir.name,
            "sections": sections,
        }
        from cfjax.checkpoint import write_json_atomic

        prev = out / "results.json"
        if args.sections != "all" and prev.exists():
            # a partial re-run replaces its sections in the earlier run's results and keeps the rest
            saved = json.loads(prev.read_text())
            if saved["meta"].get("quick") == args.quick:
                rerun = {k: meta[k] for k in ("command", "date", "seconds", "sections")}
                meta = {**saved["meta"], "reruns": saved["meta"].get("reruns", []) + [rerun]}
                R = {**saved["results"], **R}
        write_json_atomic(out / "results.json", {"meta": meta, "results": R})
        path = write_report(ctx, R, meta)
    except CfjaxError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    log(f"report -> {path} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
