"""Metrics table for a CF.npz written by any method (ECINN, DISC, ...).

    cfjax evaluate CF.npz|SHARD_DIR [--json OUT] [--oracle DIR|none] [--flow DIR|none] [--model DIR|auto|none]
                          [--data mnist5k|none] [--threshold 0.1] [--pca-k 50] [--heatmap-limit 64]

Always: validity, proximity (l1 = mean over images of the summed |x_cf - x|; l1_per_pixel = its
mean per pixel value; l2; l2_per_pixel = RMS), sparsity, seconds_per_cf (when the file records
``seconds``). With --data (default mnist5k; its train split is the reference): nn_distance to the
nearest real image of the target class and pca_error, for the counterfactuals and, as a yardstick,
for the queries. With an oracle classifier (default: the shipped ``<data>_oracle`` when there is
one): oracle_agreement. With a flow (default: the shipped ``<data>_flow`` when the image shape
matches): bits_per_dim. With a ``heatmap`` in the file and the explained model (--model, default:
the model the file names): deletion / insertion AUC of the heatmap for the predicted class, next to
gradient, gradient x input, integrated gradients and random heatmaps. With --data fakemnist5k:
marker_mass (the share of the change that falls on the two class-marker pixels).

A shard directory (``cfjax explain ... --shards``) is read one verified shard at a time: the
per-example metrics are summed and divided by N at the end, the heatmap curves use the first
--heatmap-limit queries, seconds_per_cf uses the manifest's recorded generation time. Memory
holds one shard plus the reference data, not the whole run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cfjax import metrics as M
from cfjax.errors import CfjaxError
from cfjax.model_dirs import LoadedModel
from cfjax.pipelines.explain_common import check_writable, load_cf_npz, save_npz_atomic
from cfjax.validation import non_negative_int, positive_int

CONVENTIONS = {
    "l1": "mean over images of sum |x_cf - x| over all H*W*C values",
    "l1_per_pixel": "mean over images of mean |x_cf - x| per pixel value (l1 / (H*W*C))",
    "l2": "mean over images of ||x_cf - x||_2 over all H*W*C values",
    "l2_per_pixel": "mean over images of the RMS change per pixel value (l2 / sqrt(H*W*C))",
    "sparsity": "fraction of H*W pixels whose change (max over channels) exceeds the threshold; lower = sparser",
    "nn_distance": "L2 from each counterfactual to the nearest reference (train) image of its target class",
    "pca_error": "L2 residual after projection on the top-k principal components of the reference images",
    "bits_per_dim": "negative log-likelihood under the flow in bits per dimension; lower = more likely",
    "deletion_auc": "area under p(predicted class) while pixels are set to 0 in heatmap order; lower = better",
    "insertion_auc": "area under p(predicted class) while pixels are copied onto a black image; higher = better",
    "marker_mass": "fraction of |x_cf - x| on the FakeMNIST marker pixels of the true and target class",
    "grey_share": "share of inked pixels (> 0.2) that are grey (< 0.8), channel mean; *_query: the same for the queries",
    "laplacian_energy": "sum of the squared 4-neighbour Laplacian / sum of x^2 per image; speckle raises it",
    "isolated_ink": "pixels > 0.3 whose 8 neighbours average < 0.15, per image",
}


def load_model(model_dir) -> LoadedModel:
    """A classifier or flow model directory as a :class:`~cfjax.model_dirs.LoadedModel`
    (CheckpointError/CfjaxError on any problem, or for another kind of model)."""
    from cfjax import model_dirs

    model_dir = Path(model_dir)
    kind, _, _ = model_dirs.read_config(model_dir)
    if kind not in ("classifier", "flow"):
        raise CfjaxError(f"{model_dir} holds a {kind!r} model; evaluate needs a 'classifier' or 'flow' model")
    return model_dirs.load(kind, model_dir)


# --------------------------------------------------------------------------------------------
# input checks


def _check_contents(data: dict, path: str) -> None:
    x = data["x"]
    n = x.shape[0]
    if n == 0:
        raise CfjaxError(f"{path} holds no counterfactuals (N = 0)")
    for k in ("x", "x_cf"):
        a = data[k]
        if not np.issubdtype(a.dtype, np.floating):
            raise CfjaxError(f"{path}: {k} must be float images in [0, 1], got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise CfjaxError(f"{path}: {k} contains NaN or infinite values")
        if float(a.min()) < -1e-6 or float(a.max()) > 1 + 1e-6:
            raise CfjaxError(f"{path}: {k} must lie in [0, 1], got values in [{float(a.min()):.4g}, {float(a.max()):.4g}]")
    for k in ("y", "y_pred", "y_target", "y_cf_pred"):
        a = data[k]
        if not np.issubdtype(a.dtype, np.integer):
            raise CfjaxError(f"{path}: {k} must be integer class indices, got dtype {a.dtype}")
        if a.min() < 0:
            raise CfjaxError(f"{path}: {k} contains a negative class index ({int(a.min())})")
    if "heatmap" in data:
        h = data["heatmap"]
        if h.shape not in (x.shape[:3], x.shape):
            raise CfjaxError(f"{path}: heatmap must have shape {x.shape[:3]} to match x {x.shape}, got {h.shape}")
        if not np.issubdtype(h.dtype, np.number) or not np.all(np.isfinite(h)):
            raise CfjaxError(f"{path}: heatmap must be finite numbers")
    if "seconds" in data:
        s = data["seconds"]
        if s.shape != () or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s) or s < 0:
            raise CfjaxError(f"{path}: seconds must be one non-negative number, got {s!r}")


def _check_classes(data: dict, num_classes: int, what: str, path: str) -> None:
    for k in ("y", "y_pred", "y_target"):
        top = int(data[k].max())
        if top >= num_classes:
            raise CfjaxError(f"{path}: {k} contains class {top} but {what} has classes 0..{num_classes - 1}")


def _resolve_default(spec, kind: str, dataset: str | None, notes: dict, group: str):
    """--oracle/--flow: 'none' -> None; a path -> (path, explicit); default -> shipped model or None."""
    if spec is not None and str(spec).lower() == "none":
        notes[group] = f"--{group} none"
        return None, False
    if spec is not None:
        return Path(spec), True
    if dataset is None:
        notes[group] = f"no --{group} given and --data none"
        return None, False
    from cfjax.pretrained import PRETRAINED_DIR

    path = PRETRAINED_DIR / f"{dataset}_{kind}"
    if not (path / "cfjax_model.json").exists():
        notes[group] = f"no shipped {dataset}_{kind} model (pass --{group} DIR)"
        return None, False
    return path, False


def _apply_fn(model: LoadedModel, fn: Callable) -> Callable:
    """A jitted ``x -> fn(params, x)`` with the parameters as an argument (not baked-in constants)."""
    jitted = jax.jit(fn)
    return lambda x: jitted(model.params, x)


# --------------------------------------------------------------------------------------------
# metric groups


def _mean(per_example) -> float:
    """Mean of per-example values, accumulated in float64 (0.985, not 0.98499995)."""
    return float(np.mean(np.asarray(per_example, np.float64)))


def _heatmap_metrics(data: dict, model: LoadedModel, limit: int, steps: int, ig_steps: int, batch_size: int, seed: int) -> dict:
    n = min(limit, len(data["x"]))
    x = np.asarray(data["x"][:n], np.float32)
    cls = np.asarray(data["y_pred"][:n], np.int32)
    maps = {
        "": np.asarray(data["heatmap"][:n], np.float32),
        "_random": np.random.default_rng(seed).random(x.shape[:3]).astype(np.float32),
    }
    apply = model.apply

    @jax.jit
    def attributions(params, xb, cb):
        logits = lambda z: apply(params, z)  # noqa: E731
        return {
            "_gradient": M.gradient_saliency(logits, xb, cb),
            "_gradient_x_input": jnp.sum(M.gradient_x_input(logits, xb, cb), -1),
            "_integrated_gradients": jnp.sum(M.integrated_gradients(logits, xb, cb, ig_steps), -1),
        }

    @jax.jit
    def curves(params, xb, hb, cb):
        proba = lambda z: jax.nn.softmax(apply(params, z), -1)  # noqa: E731
        return M.deletion_curve(proba, xb, hb, cb, steps).auc, M.insertion_curve(proba, xb, hb, cb, steps).auc

    bs = max(1, min(batch_size, n))
    chunks = [(i, min(i + bs, n)) for i in range(0, n, bs)]

    def pad(a):
        return a if len(a) == bs else np.concatenate([a, np.repeat(a[-1:], bs - len(a), 0)])

    attr: dict[str, list[np.ndarray]] = {k: [] for k in ("_gradient", "_gradient_x_input", "_integrated_gradients")}
    for i, j in chunks:
        out = attributions(model.params, pad(x[i:j]), pad(cls[i:j]))
        for k in attr:
            attr[k].append(np.asarray(out[k])[: j - i])
    maps.update({k: np.concatenate(v) for k, v in attr.items()})
    res: dict[str, int | float] = {"heatmap_n": n}
    for name, h in maps.items():
        dels, ins = [], []
        for i, j in chunks:
            d, a = curves(model.params, pad(x[i:j]), pad(h[i:j]), pad(cls[i:j]))
            dels.append(np.asarray(d)[: j - i])
            ins.append(np.asarray(a)[: j - i])
        res[f"deletion_auc{name}"] = _mean(np.concatenate(dels))
        res[f"insertion_auc{name}"] = _mean(np.concatenate(ins))
    return res


def _fakemnist_per_example(data: dict, path: str) -> dict:
    h = data["x"].shape[1]
    top = int(max(data["y"].max(), data["y_target"].max()))
    if top >= h:
        raise CfjaxError(f"{path}: class {top} has no FakeMNIST marker row in {h}-row images")
    classes = np.stack([data["y"], data["y_target"]], 1).astype(np.int32)
    out = {"marker_mass": M.marker_mass(data["x_cf"] - data["x"], classes, reduce=False)}
    if "heatmap" in data:
        out["marker_mass_heatmap"] = M.marker_mass(data["heatmap"], classes, reduce=False)
    return out


# --------------------------------------------------------------------------------------------
# table


ROWS = [
    ("validity", "x_cf the explained model puts in the target class (higher = better)"),
    ("l1", "mean over images of the SUM of |x_cf - x| over all H*W*C values"),
    ("l1_per_pixel", "l1 / (H*W*C): mean |x_cf - x| per pixel value"),
    ("l2", "mean over images of ||x_cf - x||_2"),
    ("l2_per_pixel", "l2 / sqrt(H*W*C): RMS change per pixel value"),
    ("sparsity", "pixels changed by > {threshold} (lower = sparser)"),
    ("seconds_per_cf", "recorded generation time per counterfactual (s)"),
    ("grey_share", "texture: share of the ink that is grey, not solid (queries: grey_share_query)"),
    ("grey_share_query", "yardstick: the same for the queries"),
    ("laplacian_energy", "texture: high-frequency energy / image energy (speckle raises it)"),
    ("laplacian_energy_query", "yardstick: the same for the queries"),
    ("isolated_ink", "texture: lone bright pixels per image"),
    ("isolated_ink_query", "yardstick: the same for the queries"),
    ("oracle_agreement", "x_cf an independent oracle puts in the target class"),
    ("judge_rbf", "x_cf the RBF random-feature pixel judge puts in the target class (cfjax.models.judges)"),
    ("judge_knn", "x_cf the PCA k-NN pixel judge puts in the target class"),
    ("judges_all_agree", "x_cf that every pixel judge puts in the target class"),
    ("elastic_net", "study: ||x_cf - x||_1 + ||x_cf - x||_2"),
    ("im1", "study: AE(cf class) / AE(query class) reconstruction error of x_cf (< 1 = more the cf class)"),
    ("im2", "study: ||AE(cf class)(x_cf) - AE(all)(x_cf)||^2 / ||x_cf||_1 (lower = better)"),
    ("fid", "study: Frechet distance of queries vs x_cf in the k-NN judge's PCA space"),
    ("oracle_accuracy_query", "yardstick: oracle accuracy on the queries"),
    ("nn_distance", "L2 to the nearest train image of the target class"),
    ("nn_distance_query", "yardstick: the same for the queries (true class)"),
    ("pca_error", "L2 residual off the top-{pca_k} PCA subspace of train images"),
    ("pca_error_query", "yardstick: the same for the queries"),
    ("bits_per_dim", "bits/dim of x_cf under the flow (lower = more likely)"),
    ("bits_per_dim_query", "yardstick: the same for the queries"),
    ("deletion_auc", "heatmap: p(pred) as top pixels are deleted (lower = better)"),
    ("insertion_auc", "heatmap: p(pred) as top pixels are inserted (higher = better)"),
    ("deletion_auc_gradient", "baseline: gradient saliency"),
    ("insertion_auc_gradient", "baseline: gradient saliency"),
    ("deletion_auc_gradient_x_input", "baseline: gradient x input"),
    ("insertion_auc_gradient_x_input", "baseline: gradient x input"),
    ("deletion_auc_integrated_gradients", "baseline: integrated gradients"),
    ("insertion_auc_integrated_gradients", "baseline: integrated gradients"),
    ("deletion_auc_random", "baseline: random heatmap"),
    ("insertion_auc_random", "baseline: random heatmap"),
    ("marker_mass", "FakeMNIST: share of |x_cf - x| on the two marker pixels (ideal 1)"),
    ("marker_mass_heatmap", "FakeMNIST: share of the heatmap on the two marker pixels"),
]


def _print_table(result: dict, notes: dict, title: str, threshold: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    for key, meaning in ROWS:
        if key in result:
            v = result[key]
            table.add_row(key, f"{v:.4g}", meaning.format(threshold=threshold, pca_k=result.get("pca_k", "k")))
    con = Console()
    con.print(table)
    if "heatmap_n" in result:
        con.print(f"heatmap curves on the first {result['heatmap_n']} queries, class = the explained model's prediction")
    for group, why in notes.items():
        con.print(f"skipped {group}: {why}")


# --------------------------------------------------------------------------------------------


def evaluate(data: dict, path: str, data_name: str | None, data_dir=None, oracle=None, flow=None, model="auto",
             threshold: float = 0.1, pca_k: int = 50, heatmap_limit: int = 64, steps: int = 20, ig_steps: int = 32,
             batch_size: int = 256, seed: int = 0) -> tuple[dict, dict]:
    """All metrics that apply to a checked CF.npz dict: (metrics, notes on what was skipped and why)."""
    return evaluate_chunks([data], path, data_name, data_dir, oracle, flow, model, threshold, pca_k, heatmap_limit,
                           steps, ig_steps, batch_size, seed)


def _sum(per_example) -> float:
    """Sum of per-example values in float64 (sum / N equals :func:`_mean` of the concatenation)."""
    return float(np.sum(np.asarray(per_example, np.float64)))


def _reference_metrics(data: dict, x, x_cf, ctx: dict, data_name, path: str, batch_size: int):
    """(name, per-example values) of the metrics that need the reference data, oracle or flow
    loaded by :func:`_setup`."""
    if "ref" in ctx:
        ref, pca = ctx["ref"], ctx["pca"]
        _check_classes(data, ref.num_classes, f"--data {ref.name}", path)
        missing = sorted(set(np.unique(data["y_target"]).tolist()) - ctx["ref_classes"])
        if missing:
            raise CfjaxError(f"--data {ref.name} train split has no image of target class(es) {missing}")
        yield "nn_distance", M.nearest_neighbour_distance(x_cf, ref.images, ref.labels, data["y_target"], reduce=False)
        yield "nn_distance_query", M.nearest_neighbour_distance(x, ref.images, ref.labels, data["y"], reduce=False)
        yield "pca_error", M.pca_reconstruction_error(x_cf, pca, reduce=False)
        yield "pca_error_query", M.pca_reconstruction_error(x, pca, reduce=False)
        if data_name.startswith("fakemnist"):
            yield from _fakemnist_per_example(data, path).items()
    if "oracle" in ctx:
        om, predict = ctx["oracle"]
        _check_classes(data, om.num_classes, f"the oracle {om.path}", path)
        yield "oracle_agreement", M.oracle_agreement(predict, x_cf, data["y_target"], batch_size, reduce=False)
        yield "oracle_accuracy_query", M.oracle_agreement(predict, x, data["y"], batch_size, reduce=False)
    if "bpd" in ctx:
        yield "bits_per_dim", M.flow_bits_per_dim(ctx["bpd"], x_cf, batch_size, reduce=False)
        yield "bits_per_dim_query", M.flow_bits_per_dim(ctx["bpd"], x, batch_size, reduce=False)


def _heatmap_model(model, first: dict, notes: dict) -> Path | None:
    """The model directory the heatmap curves use (--model, or the one the file names), or None
    with the reason in ``notes``."""
    if str(model).lower() == "none":
        notes["heatmap"] = "--model none"
        return None
    if str(model).lower() != "auto":
        return Path(model)
    named = str(first["model"]) if "model" in first and first["model"].shape == () else None
    if named and (Path(named) / "cfjax_model.json").exists():
        return Path(named)
    notes["heatmap"] = "no --model given and the CF.npz names no existing model directory"
    return None


def _file_metrics(data: dict, threshold: float):
    """(name, per-example values) of the metrics a CF file alone gives: validity, proximity,
    sparsity, and the stroke texture of x_cf and (``*_query``) of x."""
    x, x_cf = data["x"], data["x_cf"]
    yield "validity", M.validity(data["y_cf_pred"], data["y_target"], reduce=False)
    yield "l1", M.proximity_l1(x, x_cf, reduce=False)
    yield "l1_per_pixel", M.proximity_l1_per_pixel(x, x_cf, reduce=False)
    yield "l2", M.proximity_l2(x, x_cf, reduce=False)
    yield "l2_per_pixel", M.proximity_l2_per_pixel(x, x_cf, reduce=False)
    yield "sparsity", M.sparsity(x, x_cf, threshold, reduce=False)
    yield from M.stroke_texture(x_cf, reduce=False).items()
    yield from ((f"{name}_query", v) for name, v in M.stroke_texture(x, reduce=False).items())


def evaluate_chunks(chunks, path: str, data_name: str | None, data_dir=None, oracle=None, flow=None, model="auto",
                    threshold: float = 0.1, pca_k: int = 50, heatmap_limit: int = 64, steps: int = 20, ig_steps: int = 32,
                    batch_size: int = 256, seed: int = 0, seconds: float | None = None) -> tuple[dict, dict]:
    """The metrics of :func:`evaluate` over an iterable of checked CF.npz dicts (e.g. shards).

    Only one chunk is held at a time: every per-example metric is summed in float64 and divided
    by N at the end (for a single chunk this is exactly the mean); the heatmap curves use the
    first ``heatmap_limit`` queries. ``seconds`` (the whole run's generation time) overrides the
    chunks' own for ``seconds_per_cf``.
    """

    positive_int(batch_size, "batch_size")
    non_negative_int(heatmap_limit, "heatmap_limit")
    positive_int(steps, "steps")
    positive_int(ig_steps, "ig_steps")
    notes: dict = {}
    sums: dict = {}
    n_total = 0
    first = None
    ctx: dict = {}
    heat: dict = {"x": [], "y_pred": [], "heatmap": []}
    chunk_seconds = 0.0

    def add(key, per_example):
        sums[key] = sums.get(key, 0.0) + _sum(per_example)

    for data in chunks:
        if first is None:
            first = data
            image_shape = tuple(data["x"].shape[1:])
            ctx = _setup(data, path, data_name, data_dir, oracle, flow, pca_k, batch_size, notes, image_shape)
        elif tuple(data["x"].shape[1:]) != image_shape:
            raise CfjaxError(f"{path}: a shard holds images {tuple(data['x'].shape[1:])}, the first holds {image_shape}")
        x, x_cf = data["x"], data["x_cf"]
        n_total += len(x)
        for key, per_example in _file_metrics(data, threshold):
            add(key, per_example)
        if "seconds" in data:
            chunk_seconds += float(data["seconds"])
        for key, per_example in _reference_metrics(data, x, x_cf, ctx, data_name, path, batch_size):
            add(key, per_example)
        if "heatmap" in first and "heatmap" in data:
            have = sum(len(h) for h in heat["x"])
            take = max(0, heatmap_limit - have)
            for k in heat:
                heat[k].append(np.asarray(data[k][:take]))
        elif "heatmap" in first:
            raise CfjaxError(f"{path}: the first shard has a heatmap and a later one has none")
    if first is None:
        raise CfjaxError(f"{path} holds no counterfactuals")

    res = {k: v / n_total for k, v in sums.items()}
    total_seconds = seconds if seconds is not None else (chunk_seconds if "seconds" in first else None)
    if total_seconds is not None:
        res["seconds_per_cf"] = M.runtime_per_counterfactual(total_seconds, n_total)
    if "ref" in ctx:
        res["pca_k"] = ctx["pca_k"]

    if "heatmap" not in first:
        notes["heatmap"] = "the CF.npz has no heatmap"
    elif heatmap_limit == 0:
        notes["heatmap"] = "--heatmap-limit 0"
    else:
        model_dir = _heatmap_model(model, first, notes)
        if model_dir is not None:
            hd = {k: np.concatenate(v) for k, v in heat.items()}
            em = load_model(model_dir)
            if em.image_shape != image_shape:
                raise CfjaxError(f"--model {model_dir} expects images {em.image_shape} but {path} holds {image_shape}")
            _check_classes(first, em.num_classes, f"the model {model_dir}", path)
            res.update(_heatmap_metrics(hd, em, heatmap_limit, steps, ig_steps, batch_size, seed))
            res["heatmap_model"] = str(model_dir)

    return {k: v if isinstance(v, str) else (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in res.items()}, notes


def _setup(first: dict, path: str, data_name, data_dir, oracle, flow, pca_k: int, batch_size: int, notes: dict, image_shape) -> dict:
    """Load once what the per-chunk metrics need: reference data + PCA, oracle, flow."""
    from cfjax.data import load_dataset

    ctx: dict = {}
    if data_name is not None:
        ref = load_dataset(data_name, "train", data_dir)
        if ref.image_shape != image_shape:
            raise CfjaxError(f"--data {data_name} images are {ref.image_shape} but {path} holds {image_shape}; pass the dataset the counterfactuals came from (or --data none)")
        positive_int(pca_k, "pca_k")
        k = min(pca_k, len(ref), int(np.prod(ref.image_shape)))
        ctx.update(ref=ref, pca=M.fit_pca(ref.images, k), pca_k=k, ref_classes=set(np.unique(ref.labels).tolist()))
    else:
        notes["realism"] = "--data none"

    oracle_dir, _ = _resolve_default(oracle, "oracle", data_name, notes, "oracle")
    if oracle_dir is not None:
        om = load_model(oracle_dir)
        if om.image_shape != image_shape:
            raise CfjaxError(f"oracle {oracle_dir} expects images {om.image_shape} but {path} holds {image_shape}")
        ctx["oracle"] = (om, _apply_fn(om, om.apply))

    flow_dir, explicit = _resolve_default(flow, "flow", data_name, notes, "flow")
    if flow_dir is not None:
        fm = load_model(flow_dir)
        if fm.bits_per_dim is None:
            raise CfjaxError(f"--flow {flow_dir} holds a {fm.kind!r} model, not a flow")
        if fm.image_shape != image_shape:
            if explicit:
                raise CfjaxError(f"flow {flow_dir} expects images {fm.image_shape} but {path} holds {image_shape}")
            notes["flow"] = f"shipped flow expects {fm.image_shape}, the file holds {image_shape}"
        else:
            ctx["bpd"] = _apply_fn(fm, fm.bits_per_dim)
    return ctx


def _parse_judges(spec: str) -> tuple[str, ...]:
    from cfjax.models import judges

    if str(spec).lower() == "none":
        return ()
    kinds = tuple(k.strip() for k in str(spec).split(",") if k.strip())
    bad = [k for k in kinds if k not in judges.KINDS]
    if bad or not kinds:
        raise CfjaxError(f"--judges must be a comma list of {', '.join(judges.KINDS)} or 'none', got {spec!r}")
    return kinds


def _train_split(data_name: str, data_dir):
    """The train split of ``data_name`` and a short content hash naming its cached judges."""
    import hashlib

    from cfjax.data import load_dataset

    train = load_dataset(data_name, "train", data_dir)
    return train, hashlib.sha256(train.images.tobytes() + train.labels.tobytes()).hexdigest()[:16]


def _fitted_judge(kind: str, data_name: str, data_dir) -> dict:
    """A judge fit on the train split of ``data_name``, cached by dataset and content hash."""
    from cfjax.models import judges
    from cfjax.pipelines.study import cache_dir

    train, digest = _train_split(data_name, data_dir)
    cache = cache_dir() / f"judge_{kind}_{data_name}_{digest}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception:  # noqa: BLE001 - a damaged cache is refit
            pass
    judge = judges.fit(kind, train.images, train.labels, train.num_classes)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_npz_atomic(cache, **judge)  # a unique temporary name: concurrent runs may fill the cache together
    except (OSError, CfjaxError):
        pass  # caching is an optimisation only
    return judge


def judge_metrics(data: dict, data_name: str, data_dir, kinds) -> dict:
    """Target agreement of each pixel judge on x_cf, and of all of them at once."""
    from cfjax.models import judges

    out, hits = {}, []
    for kind in kinds:
        h = judges.predict(_fitted_judge(kind, data_name, data_dir), data["x_cf"]) == data["y_target"]
        out[f"judge_{kind}"] = float(np.mean(h))
        hits.append(h)
    out["judges_all_agree"] = float(np.mean(np.all(hits, axis=0)))
    return out


def study_metrics(data: dict, data_name: str, data_dir) -> dict:
    """The evaluation study's ElasticNet, IM1, IM2 and Frechet distance (:mod:`cfjax.pipelines.study`),
    with autoencoders and the k-NN judge fit on ``data_name``'s train split (cached)."""
    from cfjax.pipelines import study

    train, digest = _train_split(data_name, data_dir)
    aes = study.cached_autoencoders(train.images, train.labels, train.num_classes, f"{data_name}_{digest}")
    table = study.study_table(data["x"], data["x_cf"], data["y_pred"], data["y_cf_pred"], aes,
                              _fitted_judge("knn", data_name, data_dir))
    return {k: v.get("mean", v.get("value")) for k, v in table.items()}


def evaluate_file(cf, *, json=None, data: str | None = "mnist5k", data_dir=None, oracle=None, flow=None, model="auto",
                  threshold: float = 0.1, pca_k: int = 50, heatmap_limit: int = 64, steps: int = 20, ig_steps: int = 32,
                  batch_size: int = 256, judges: str = "rbf,knn", study: bool = False, seed: int = 0) -> dict:
    """Print the metrics table of the CF.npz or shard directory ``cf`` (``data`` None: no realism
    reference) and, with ``json``, write them there. Returns the metrics."""
    from cfjax.checkpoint import write_json_atomic
    from cfjax.pipelines import shards as sh

    json_path = check_writable(json, "--json") if json else None
    data_name = data
    opts = (data_dir, oracle, flow, model, threshold, pca_k, heatmap_limit, steps, ig_steps, batch_size, seed)
    if sh.is_shard_dir(cf):
        # A shard directory: one shard in memory at a time; every shard is checked against the manifest.
        shard_set = sh.open_shards(cf)

        def chunks():
            for i, d in enumerate(sh.iter_shards(shard_set)):
                _check_contents(d, str(shard_set.out_dir / shard_set.entries[i]["file"]))
                yield d

        res, notes = evaluate_chunks(chunks(), cf, data_name, *opts, seconds=shard_set.seconds)
        method = str(shard_set.header.get("method", "unknown"))
        n = shard_set.num_done
        title = f"{cf}: {n} counterfactuals in {len(shard_set.entries)} shard(s) ({method})"
    else:
        arrays = load_cf_npz(cf)
        _check_contents(arrays, cf)
        kinds = _parse_judges(judges)  # checked before the (slower) evaluation
        res, notes = evaluate(arrays, cf, data_name, *opts)
        if kinds and data_name is not None:
            res.update(judge_metrics(arrays, data_name, data_dir, kinds))
        elif kinds:
            notes["judges"] = "--data none"
        if study and data_name is not None:
            missing = [k for k in ("y_pred", "y_cf_pred") if k not in arrays]
            if missing:
                notes["study"] = f"{cf} has no {' or '.join(missing)}"
            else:
                res.update(study_metrics(arrays, data_name, data_dir))
        elif study:
            notes["study"] = "--data none"
        method = str(arrays["method"]) if "method" in arrays and arrays["method"].shape == () else "unknown"
        n = int(arrays["x"].shape[0])
        title = f"{cf}: {n} counterfactuals ({method})"
    _print_table(res, notes, title, threshold)
    if json_path is not None:
        payload = {
            "file": str(cf), "method": method, "n": n, "data": data_name, "threshold": threshold,
            **res, "conventions": CONVENTIONS, "skipped": notes,
        }
        write_json_atomic(json_path, payload)
        print(f"metrics -> {json_path}")
    return res
