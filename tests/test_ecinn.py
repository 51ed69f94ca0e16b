"""ECINN on a small random flow: geometry against NumPy, batching, vmap, all-classes call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfjax.errors import CfjaxError
from cfjax.methods import ecinn
from cfjax.models import flow_classifier as fc
from cfjax.models import latent as latent_lib
from cfjax.models.glow import GlowConfig
from cfjax.models.latent import LatentConfig

CFG = fc.FlowClassifierConfig(
    glow=GlowConfig(image_shape=(8, 8, 1), num_levels=2, steps_per_level=1, hidden_channels=8, max_hidden_channels=8),
    latent=LatentConfig(num_classes=4),
)


@pytest.fixture(scope="module")
def params():
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1))
    p = fc.init_flow_classifier(jax.random.PRNGKey(0), CFG, x)
    # Perturb so the couplings are not the identity.
    leaves, tree = jax.tree_util.tree_flatten(p["glow"])
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    p["glow"] = jax.tree_util.tree_unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    p["class_means"] = p["latent"]["mu"] + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p["latent"]["mu"].shape)
    return p


def test_latent_step_geometry_against_numpy():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 5)) * 3
    means = mu + rng.normal(size=(3, 5)) * 0.5
    z = rng.normal(size=(6, 5))
    src = np.array([0, 0, 1, 2, 1, 2])
    tgt = np.array([1, 2, 0, 0, 2, 2])  # last: source == target
    lp = {"mu": jnp.asarray(mu, jnp.float32), "logit_prior": jnp.zeros(3)}
    z_cf, a0, a = ecinn.latent_step(lp, jnp.asarray(means, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(src), jnp.asarray(tgt), step="boundary")
    for i in range(5):
        p_, q = src[i], tgt[i]
        w = (mu[q] - mu[p_]) / np.linalg.norm(mu[q] - mu[p_])
        b = -0.5 * (mu[p_] + mu[q]) @ w
        d = means[q] - means[p_]
        want = (-b - w @ z[i]) / (w @ d)
        np.testing.assert_allclose(float(a0[i]), want, rtol=1e-4)
        # On the boundary: equidistant from both class means.
        zc = np.asarray(z_cf[i], np.float64)
        np.testing.assert_allclose(np.linalg.norm(zc - mu[p_]), np.linalg.norm(zc - mu[q]), rtol=1e-4)
    assert float(a[5]) == 0.0 and np.allclose(np.asarray(z_cf[5]), z[5], atol=1e-6)
    # The step rules as functions of alpha0.
    for rule, f in [("paper", lambda t: t + 0.8 * (1 - t)), ("code", lambda t: 0.8 + 0.5 * t), ("beyond", lambda t: 1.0 + 0.5 * t), ("full", lambda t: np.ones_like(t))]:
        _, a0r, ar = ecinn.latent_step(lp, jnp.asarray(means, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(src), jnp.asarray(tgt), step=rule)
        np.testing.assert_allclose(np.asarray(ar[:5]), f(np.asarray(a0r[:5])), rtol=1e-5)


@pytest.mark.parametrize("direction", ["predicted_means", "mu"])
def test_residual_pulls_the_query_towards_its_class_mean_then_steps(direction):
    """residual r: z_s = m_p + r (z - m_p), then the usual move from z_s (alpha0 measured there);
    r = 1 is the paper's move exactly, r = 0 starts from the class mean itself."""
    rng = np.random.default_rng(4)
    mu = rng.normal(size=(3, 5)) * 3
    means = mu + rng.normal(size=(3, 5)) * 0.5
    z = rng.normal(size=(5, 5)) + means[[0, 1, 2, 0, 1]]
    src, tgt = np.array([0, 1, 2, 0, 1]), np.array([1, 2, 0, 2, 1])  # last: source == target
    lp = {"mu": jnp.asarray(mu, jnp.float32), "logit_prior": jnp.zeros(3)}
    m = means if direction == "predicted_means" else mu
    args = (lp, jnp.asarray(means, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(src), jnp.asarray(tgt), "code", direction)
    plain = ecinn.latent_step(*args)
    np.testing.assert_array_equal(np.asarray(ecinn.latent_step(*args, residual=1.0)[0]), np.asarray(plain[0]))
    for r in (0.0, 0.5):
        z_cf, a0, a = ecinn.latent_step(*args, residual=r)
        for i in range(4):
            p_, q = src[i], tgt[i]
            zs = m[p_] + r * (z[i] - m[p_])
            w = (mu[q] - mu[p_]) / np.linalg.norm(mu[q] - mu[p_])
            b = -0.5 * (mu[p_] + mu[q]) @ w
            d = m[q] - m[p_]
            want_a0 = (-b - w @ zs) / (w @ d)
            np.testing.assert_allclose(float(a0[i]), want_a0, rtol=1e-4)
            np.testing.assert_allclose(np.asarray(z_cf[i]), zs + (0.8 + 0.5 * want_a0) * d, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(z_cf[4]), z[4], atol=1e-6)  # source == target: nothing moves
    for bad in (-0.1, 1.5, float("nan"), "x", True):
        with pytest.raises(CfjaxError, match="residual must be a number in"):
            ecinn.latent_step(*args, residual=bad)


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_residual_reaches_the_explainer_and_the_all_classes_call(params):
    """residual flows through counterfactual -> counterfactual_from_latent (first move only),
    counterfactuals_all_classes and the Explainer (the CLI's pipeline): each equals decoding the
    pulled-in move directly."""
    x = jax.random.uniform(jax.random.PRNGKey(7), (6, 8, 8, 1))
    z, _ = fc.encode(params, CFG, x)
    y = jnp.argmax(latent_lib.class_logits(params["latent"], z, False), -1)
    t = (y + 1) % 4
    z_cf, _, _ = ecinn.latent_step(params["latent"], params["class_means"], z, y, t, "code", residual=0.3)
    want = np.clip(np.asarray(fc.decode(params, CFG, z_cf)), 0, 1)
    out = ecinn.counterfactual(params, CFG, x, t, step="code", residual=0.3)
    np.testing.assert_allclose(np.asarray(out["x_cf"]), want, atol=1e-5)
    allc = ecinn.counterfactuals_all_classes(params, CFG, x, step="code", residual=0.3)["x_cf"]
    np.testing.assert_allclose(np.asarray(allc)[np.arange(6), np.asarray(t)], want, atol=1e-4)
    assert not np.allclose(np.asarray(ecinn.counterfactual(params, CFG, x, t, step="code")["x_cf"]), want, atol=1e-3)
    from cfjax import Explainer

    ex = Explainer(params, CFG, step="code", refine=0, residual=0.3)
    np.testing.assert_allclose(ex.explain(np.asarray(x), target=np.asarray(t))["x_cf"], want, atol=1e-5)
    with pytest.raises(CfjaxError, match="residual"):
        Explainer(params, CFG, residual=-1)


def test_paper_step_crosses_the_boundary_in_latent_space(params):
    x = jax.random.uniform(jax.random.PRNGKey(5), (32, 8, 8, 1))
    z, _ = fc.encode(params, CFG, x)
    y_pred = jnp.argmax(latent_lib.class_logits(params["latent"], z, False), -1)
    tgt = (y_pred + 1) % 4
    z_cf, a0, a = ecinn.latent_step(params["latent"], params["latent"]["mu"], z, y_pred, tgt, "paper", "mu")
    ok = np.asarray(a0) < 1.0  # the paper's rule overshoots the boundary whenever alpha0 < 1
    assert ok.mean() > 0.5
    # Past the pairwise p/q hyperplane: closer to mu_q than to mu_p (a third class may still win
    # the argmax; validity over all classes is a property of the trained model, measured elsewhere).
    d2 = np.asarray(latent_lib.squared_distances(params["latent"], z_cf))
    rows = np.arange(len(d2))
    assert np.all(d2[rows, np.asarray(tgt)][ok] < d2[rows, np.asarray(y_pred)][ok])


def test_counterfactual_is_inverse_of_latent_move(params):
    x = jax.random.uniform(jax.random.PRNGKey(6), (8, 8, 8, 1), minval=0.3, maxval=0.7)
    out = ecinn.counterfactual(params, CFG, x, jnp.zeros(8, jnp.int32), step=0.0)  # alpha = 0: reconstruction
    np.testing.assert_allclose(np.asarray(out["x_cf"]), np.asarray(x), atol=1e-4)
    out = ecinn.counterfactual(params, CFG, x, jnp.full(8, 2, jnp.int32), step="full")
    z_back, _ = fc.encode(params, CFG, fc.decode(params, CFG, out["z_cf"]))
    np.testing.assert_allclose(np.asarray(z_back), np.asarray(out["z_cf"]), atol=1e-3)


@pytest.mark.parametrize("refine, step", [(0, "paper"), (2, "paper"), (2, "adaptive-wide")])
def test_vmap_equals_batched_and_jit(params, refine, step):
    x = jax.random.uniform(jax.random.PRNGKey(7), (6, 8, 8, 1))
    t = jnp.array([0, 1, 2, 3, 0, 1])
    batched = jax.jit(ecinn.counterfactual, static_argnums=(1, 4, 5, 6))(params, CFG, x, t, step, "predicted_means", refine)
    one = lambda xi, ti: ecinn.counterfactual(params, CFG, xi[None], ti[None], step, refine=refine)["x_cf"][0]  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.vmap(one)(x, t)), np.asarray(batched["x_cf"]), atol=1e-5)


def test_all_classes_in_one_call_matches_per_target(params):
    x = jax.random.uniform(jax.random.PRNGKey(8), (3, 8, 8, 1))
    allc = ecinn.counterfactuals_all_classes(params, CFG, x)
    assert allc["x_cf"].shape == (3, 4, 8, 8, 1)
    for t in range(4):
        single = ecinn.counterfactual(params, CFG, x, jnp.full(3, t))
        np.testing.assert_allclose(np.asarray(allc["x_cf"][:, t]), np.asarray(single["x_cf"]), atol=1e-5)


@pytest.mark.parametrize("rule", ["adaptive", "adaptive-wide"])
def test_search_rule_keeps_the_farthest_candidate_in_the_pixel_range(params, monkeypatch, rule):
    """A search rule per query against its candidate rules run one by one and chosen in NumPy."""
    x = jax.random.uniform(jax.random.PRNGKey(9), (32, 8, 8, 1))
    t = jnp.array([0, 1, 2, 3] * 8)
    rules, _ = ecinn.SEARCH_RULES[rule]
    singles = [ecinn.counterfactual(params, CFG, x, t, step=r) for r in rules]
    oor = np.stack([np.abs((r := np.asarray(fc.decode(params, CFG, s["z_cf"]))) - np.clip(r, 0, 1)).mean((1, 2, 3)) for s in singles])
    tol = float(np.quantile(oor[0], 0.8))  # the first candidate leaves the range for a fifth of these queries
    monkeypatch.setitem(ecinn.SEARCH_RULES, rule, (rules, tol))
    out = ecinn.counterfactual(params, CFG, x, t, step=rule)
    for i in range(len(x)):
        k = next((k for k in range(len(rules)) if oor[k, i] <= tol), len(rules) - 1)
        np.testing.assert_allclose(np.asarray(out["x_cf"][i]), np.asarray(singles[k]["x_cf"][i]), atol=1e-5)
        np.testing.assert_allclose(float(out["alpha"][i]), float(singles[k]["alpha"][i]), rtol=1e-6)
    picked = {next((k for k in range(len(rules)) if oor[k, i] <= tol), len(rules) - 1) for i in range(len(x)) if int(t[i]) != int(out["y_pred"][i])}
    assert len(picked) > 1, picked  # the test saw more than one candidate chosen
    # Candidate k is decoded only for the queries whose candidates before it all left the range,
    # gathered into a sub-batch: at least one later candidate ran on a sub-batch (not the whole).
    tried = [int(np.sum(np.all(oor[:k] > tol, axis=0))) for k in range(1, len(rules))]
    assert any(0 < n <= ecinn.subbatch_sizes(len(x))[-2] for n in tried), (tried, ecinn.subbatch_sizes(len(x)))
    allc = ecinn.counterfactuals_all_classes(params, CFG, x[:3], step=rule)
    for c in range(4):
        np.testing.assert_allclose(np.asarray(allc["x_cf"][:, c]), np.asarray(ecinn.counterfactual(params, CFG, x[:3], jnp.full(3, c), step=rule)["x_cf"]), atol=1e-5)
    with pytest.raises(CfjaxError, match="search rule"):
        ecinn.latent_step(params["latent"], params["class_means"], jnp.zeros((1, 64)), jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), step=rule)


@pytest.mark.parametrize("tol, tried", [(-1.0, 5), (float("inf"), 1)])
def test_benchmark_counts_the_candidates_decoded(params, monkeypatch, tol, tried):
    """benchmarks.bench_ecinn.executed_count: with every candidate out of range (tolerance -1)
    each query decodes all five of adaptive-wide's, the work of encoding once and decoding the
    five candidates of the batch in one call (counted from that program's jaxpr); with every
    candidate in range (inf) one, the work of a plain step rule's program."""
    from benchmarks import bench_ecinn, roofline

    x = jax.random.uniform(jax.random.PRNGKey(4), (8, 8, 8, 1))
    rules, _ = ecinn.SEARCH_RULES["adaptive-wide"]
    monkeypatch.setitem(ecinn.SEARCH_RULES, "adaptive-wide", (rules, tol))
    out = bench_ecinn.cfjax_fn(CFG, "adaptive-wide", refine=0)(params, x)
    np.testing.assert_array_equal(np.asarray(out["candidate"]), np.full(8, tried - 1))

    def decode_all(p, x):  # encode, then the first `tried` candidates of every query in one decode
        z, _ = fc.encode(p, CFG, x)
        y = jnp.argmax(latent_lib.class_logits(p["latent"], z, CFG.latent.use_prior_at_test), -1)
        zs = [ecinn.latent_step(p["latent"], p["class_means"], z, y, (y + 1) % 4, r)[0] for r in rules[:tried]]
        return fc.decode(p, CFG, jnp.concatenate(zs))

    count = bench_ecinn.executed_count(params, CFG, x, "adaptive-wide", 0, out)
    assert count["decoded_query_candidates"] == 8 * tried
    assert count["flops"] == pytest.approx(roofline.jaxpr_flops(decode_all, params, x)["flops"], rel=1e-9)


def test_heatmap_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(2, 4, 4, 3)), rng.uniform(size=(2, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(ecinn.heatmap(jnp.asarray(a), jnp.asarray(b))), np.abs(b - a).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ecinn.heatmap(jnp.asarray(a), jnp.asarray(b), signed=True)), (b - a).sum(-1), rtol=1e-6)


def test_bad_step_and_direction(params):
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(CfjaxError, match="step rule"):
        ecinn.counterfactual(params, CFG, x, jnp.zeros(1, jnp.int32), step="nope")
    with pytest.raises(CfjaxError, match="direction"):
        ecinn.counterfactual(params, CFG, x, jnp.zeros(1, jnp.int32), direction="nope")


@pytest.mark.parametrize("preprocess", [pytest.param("logit", marks=pytest.mark.slow), "affine"])  # logit: not the default
def test_encode_logdet_includes_preprocessing(preprocess):
    """log|det dz/dx| of the full model (preprocessing + flow) against jacfwd; decode inverts."""
    cfg = fc.FlowClassifierConfig(
        glow=GlowConfig(image_shape=(4, 4, 1), num_levels=1, steps_per_level=1, hidden_channels=4, max_hidden_channels=4),
        latent=LatentConfig(num_classes=2),
        preprocess=preprocess,
    )
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 4, 4, 1), minval=0.05, maxval=0.95)
    p = fc.init_flow_classifier(jax.random.PRNGKey(1), cfg, jax.random.uniform(jax.random.PRNGKey(2), (8, 4, 4, 1)))
    leaves, tree = jax.tree_util.tree_flatten(p["glow"])
    p["glow"] = jax.tree_util.tree_unflatten(tree, [l + 0.05 * jax.random.normal(jax.random.PRNGKey(i), l.shape) for i, l in enumerate(leaves)])
    z, logdet = fc.encode(p, cfg, x)
    jac = jax.jacfwd(lambda v: fc.encode(p, cfg, v.reshape(1, 4, 4, 1))[0].ravel())(x.ravel())
    np.testing.assert_allclose(float(logdet[0]), float(jnp.linalg.slogdet(jac)[1]), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(fc.decode(p, cfg, z)), np.asarray(x), atol=1e-4)


def test_logit_decoding_stays_near_the_pixel_range():
    cfg = fc.FlowClassifierConfig(preprocess="logit", logit_alpha=0.01)
    u = jnp.linspace(-50.0, 50.0, 101).reshape(1, 101, 1, 1)
    x = fc.from_flow_space(cfg, u)
    bound = 0.01 / 0.98
    assert float(x.min()) >= -bound - 1e-6 and float(x.max()) <= 1 + bound + 1e-6


def test_dequantize_noise_stays_in_range():
    cfg = fc.FlowClassifierConfig()
    x = jnp.concatenate([jnp.zeros(500), jnp.ones(500)])
    y = fc.dequantize(jax.random.PRNGKey(0), cfg, x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and float(jnp.std(y)) > 0


def test_dequantize_without_boundary_is_the_plain_sum_and_reflect_folds_it():
    """noise_boundary "none" (the IB-INN authors' pipeline) is x + U(0, 1/256) + sigma N(0, 1) as
    drawn, recomputed here from the same keys; "reflect" folds that same sum into [0, 1]."""
    x = jnp.concatenate([jnp.zeros(400), jnp.full(200, 0.5), jnp.ones(400)])
    key = jax.random.PRNGKey(3)
    ku, kn = jax.random.split(key)
    plain = np.asarray(x) + np.asarray(jax.random.uniform(ku, x.shape, maxval=1 / 256)) + 0.01 * np.asarray(jax.random.normal(kn, x.shape))
    none = np.asarray(fc.dequantize(key, fc.FlowClassifierConfig(noise_boundary="none"), x))
    np.testing.assert_allclose(none, plain, atol=1e-7)
    assert (none[:400] < 0).mean() > 0.3 and (none[600:] > 1).mean() > 0.3  # the noise leaves the range at both ends
    folded = np.where(plain < 0, -plain, np.where(plain > 1, 2 - plain, plain))
    np.testing.assert_allclose(np.asarray(fc.dequantize(key, fc.FlowClassifierConfig(), x)), folded, atol=1e-7)


def test_noise_boundary_is_checked_and_recorded():
    with pytest.raises(CfjaxError, match="noise_boundary"):
        fc.FlowClassifierConfig(noise_boundary="clip")
    with pytest.raises(CfjaxError, match="logit"):
        fc.FlowClassifierConfig(noise_boundary="none", preprocess="logit")
    cfg = fc.FlowClassifierConfig(noise_boundary="none")
    assert fc.FlowClassifierConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["noise_boundary"]  # a model saved before the field: it was trained with reflection
    assert fc.FlowClassifierConfig.from_dict(old).noise_boundary == "reflect"


def test_package_exposes_the_pure_functions():
    import cfjax

    assert cfjax.ecinn.counterfactual is ecinn.counterfactual
    assert cfjax.glow.glow_forward is not None and cfjax.latent.ib_loss is latent_lib.ib_loss
    assert callable(cfjax.flows.actnorm.forward) and callable(cfjax.metrics.validity)


def _refine_reference(params, config, z, y, target, step, refine):
    """Refinement as first written: every round re-encodes and re-steps the whole batch, a fixed
    number of rounds, and the final predictions come from one more encode."""
    x_cf, *_ = ecinn.step_and_decode(params, config, z, y, target, step)
    rounds = np.zeros(len(y), np.int32)
    for _ in range(refine):
        z1, _ = fc.encode(params, config, x_cf)
        p1 = jnp.argmax(latent_lib.class_logits(params["latent"], z1, config.latent.use_prior_at_test), -1)
        done = np.asarray((p1 == target) | (y == target))
        z2, _, _ = ecinn.latent_step(params["latent"], params["class_means"], z1, p1, target, step)
        x2 = jnp.clip(fc.decode(params, config, z2), 0.0, 1.0)
        x_cf = jnp.where(done[:, None, None, None], x_cf, x2)
        rounds += ~done
    return np.asarray(x_cf), rounds, np.asarray(fc.predict_proba(params, config, x_cf))


# The shipped setting (1/8, 1/4) runs by default; the other two in the slow suite (time).
@pytest.mark.parametrize("fractions, sizes", [pytest.param((), (32,), marks=pytest.mark.slow), ((1 / 8, 1 / 4), (4, 8, 32)),
                                              pytest.param((1 / 8, 1 / 4, 1 / 2), (4, 8, 16, 32), marks=pytest.mark.slow)])
def test_refinement_stops_early_and_moves_only_the_queries_left(monkeypatch, fractions, sizes):
    """The while loop (rounds stop when all queries are done; a round gathers the queries left
    into the smallest sub-batch of SUBBATCH_FRACTIONS of the batch that holds them) gives the
    whole-batch, fixed-round refinement's counterfactuals, rounds and predictions. Shipped flow,
    32 queries, a short fixed step (0.25) so that rounds are needed: 31 queries need a first round
    (the whole batch), 17 a second (the whole batch), 3 a third (a sub-batch of 4)."""
    from cfjax.data import load_dataset
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir

    monkeypatch.setattr(ecinn, "SUBBATCH_FRACTIONS", fractions)
    assert ecinn.subbatch_sizes(32) == sizes
    params, config, _ = load_flow(default_model_dir("flow", "mnist5k"))
    x = jnp.asarray(load_dataset("mnist5k", "test").images[:32], jnp.float32)
    z, _ = fc.encode(params, config, x)
    y = jnp.argmax(latent_lib.class_logits(params["latent"], z, config.latent.use_prior_at_test), -1)
    target = (y + 1) % 10
    out = jax.jit(lambda p, z: ecinn.counterfactual_from_latent(p, config, z, y, target, 0.25, refine=3))(params, z)
    x_ref, rounds_ref, probs_ref = _refine_reference(params, config, z, y, target, 0.25, 3)
    np.testing.assert_array_equal(np.asarray(out["refine_rounds"]), rounds_ref)
    assert np.bincount(rounds_ref, minlength=4).tolist()[1:] == [14, 14, 3]  # rounds of 31, 17 and 3 queries ran
    np.testing.assert_allclose(np.asarray(out["x_cf"]), x_ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["probs_cf"]), probs_ref, atol=1e-4)
