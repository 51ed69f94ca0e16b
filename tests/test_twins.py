"""The PyTorch twins compute the same functions as cfjax (the parity every benchmark asserts first).

Default tests use tiny random models of the same architectures (fast to compile); the parity on
the shipped checkpoints, exactly as the benchmarks run it, is marked slow. Each parity function
raises AssertionError with the measured differences when a tolerance (stated in the benchmark
module and written into its results JSON) is exceeded. torch and FrEIA come with the test extra.
"""

import os
import sys
from types import SimpleNamespace
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import bench_disc, bench_ecinn, bench_train_flow  # noqa: E402
from benchmarks.twins.disc import TwinCNN  # noqa: E402
from benchmarks.twins.flow import TwinFlowClassifier  # noqa: E402
from benchmarks.twins.ibinn import TwinIBINNClassifier  # noqa: E402
from cfjax.models import flow_classifier as fc  # noqa: E402
from cfjax.models.classifier import ClassifierConfig, classifier_apply, init_classifier  # noqa: E402
from cfjax.models.glow import GlowConfig  # noqa: E402
from cfjax.models.ibinn import IBINNConfig  # noqa: E402
from cfjax.models.latent import LatentConfig  # noqa: E402

torch.set_num_threads(1)  # small batches on shared cores: one thread is the fast setting

TINY_FLOW = fc.FlowClassifierConfig(
    glow=GlowConfig(image_shape=(8, 8, 1), num_levels=2, steps_per_level=1, hidden_channels=8, max_hidden_channels=16),
    latent=LatentConfig(num_classes=10, beta=8.0),
)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_flow():
    x = _images(32, TINY_FLOW.image_shape)
    params = fc.init_flow_classifier(jax.random.PRNGKey(0), TINY_FLOW, x)
    # Perturb so the couplings are not the identity and classes differ.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    return params, TINY_FLOW, TinyTwin(params), x


def TinyTwin(params, trainable=False):
    return TwinFlowClassifier(params, TINY_FLOW, trainable=trainable)


def test_ecinn_twin_matches_cfjax(tiny_flow):
    params, config, twin, x = tiny_flow
    d = bench_ecinn.parity(16, (params, config, twin, x, torch))
    assert d["latent_z"] <= bench_ecinn.TOL["latent_z"] and d["x_cf"] <= bench_ecinn.TOL["x_cf"]
    assert d["same_refine_rounds"] and d["same_y_pred"]


def test_ecinn_parity_can_fail(tiny_flow):
    """A twin with one coupling bias changed must fail the parity check."""
    params, config, _, x = tiny_flow
    bad = TinyTwin(params)
    coupling = [m for m in bad.inn.module_list if hasattr(m, "subnet")][1]
    with torch.no_grad():
        coupling.subnet[4].bias.add_(0.05)
    with pytest.raises(AssertionError, match="parity failed"):
        bench_ecinn.parity(16, (params, config, bad, x, torch))


TINY_IBINN = fc.FlowClassifierConfig(
    glow=IBINNConfig(image_shape=(8, 8, 1), blocks_high=2, blocks_low=2, width_high=4, width_low=8, dense_width=16),
    latent=LatentConfig(num_classes=10, beta=8.0),
)


@pytest.fixture(scope="module")
def tiny_ibinn():
    """A tiny IB-INN flow classifier with every weight and BN statistic moved off its init."""
    x = _images(32, TINY_IBINN.image_shape)
    params = fc.init_flow_classifier(jax.random.PRNGKey(0), TINY_IBINN, x)
    rng = np.random.default_rng(3)  # larger moves make the 4-block inverse ill-conditioned in float32
    params["glow"]["net"] = jax.tree_util.tree_map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params["glow"]["net"])
    params["glow"]["bn"] = jax.tree_util.tree_map(lambda a: a + 0.3 * np.abs(rng.standard_normal(a.shape)).astype(np.float32), params["glow"]["bn"])
    params["class_means"] = params["class_means"] + 0.3 * rng.standard_normal(params["class_means"].shape).astype(np.float32)
    return params, TINY_IBINN, TwinIBINNClassifier(params, TINY_IBINN).eval(), x


@pytest.mark.parametrize("step", ["code", "adaptive", "adaptive-wide"])
def test_ibinn_twin_matches_cfjax(tiny_ibinn, step):
    """The IB-INN twin: latents, log-determinants, decodes and ECINN (a step rule and the CLI's
    search rule, with refinement rounds) equal cfjax's within the benchmark's tolerances."""
    params, config, twin, x = tiny_ibinn
    d = bench_ecinn.parity(16, (params, config, twin, x, torch), step, 2)
    assert d["latent_z"] <= bench_ecinn.TOL["latent_z"] and d["x_cf"] <= bench_ecinn.TOL["x_cf"]
    assert d["same_refine_rounds"] and d["same_y_pred"]


def test_ibinn_twin_parity_can_fail(tiny_ibinn):
    """One BN running mean of one low-resolution block changed in the twin: parity must fail."""
    params, config, _, x = tiny_ibinn
    before = np.array(params["glow"]["bn"]["low"]["norm1"]["mean"])
    bad = TwinIBINNClassifier(params, config).eval()
    with torch.no_grad():
        bad.flow.low[1].mean0.add_(0.5)
    # the twin holds copies: changing it must not reach the JAX parameters
    np.testing.assert_array_equal(np.asarray(params["glow"]["bn"]["low"]["norm1"]["mean"]), before)
    with pytest.raises(AssertionError, match="parity failed"):
        bench_ecinn.parity(16, (params, config, bad, x, torch), "code", 2)


def test_ibinn_twin_refuses_a_glow_flow(tiny_flow):
    from cfjax.errors import CfjaxError

    with pytest.raises(CfjaxError, match="IB-INN"):
        TwinIBINNClassifier(tiny_flow[0], TINY_FLOW)


def test_twin_is_built_from_freia_blocks(tiny_flow):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    twin = tiny_flow[2]
    assert isinstance(twin.inn, Ff.SequenceINN)
    assert {type(m) for m in twin.inn.module_list} == {Fm.HaarDownsampling, Fm.ActNorm, Fm.Fixed1x1Conv, Fm.AffineCouplingOneSided}


@pytest.mark.slow  # moved out of the default suite for time; run with -m slow
def test_training_twin_matches_cfjax(tiny_flow):
    params, config, _, x = tiny_flow
    train = SimpleNamespace(images=x, labels=(np.arange(len(x)) % 10).astype(np.int32))
    d = bench_train_flow.parity(8, (params, config, train, torch))
    assert d["loss"] <= bench_train_flow.TOL["loss"]
    assert d["grad_rel"] <= bench_train_flow.TOL["grad_rel"] and d["grad_max_abs"] > 0
    assert d["params_after_3_steps"] <= bench_train_flow.TOL["params_after_3_steps"] <= d["param_change"]
    assert d["update_rel_l2"] <= bench_train_flow.TOL["update_rel_l2"]


def test_disc_twin_matches_cfjax():
    cfg = ClassifierConfig(arch="cnn", image_shape=(8, 8, 1), width=4, hidden=16)
    variables = init_classifier(jax.random.PRNGKey(0), cfg)
    # Non-trivial running statistics, so the BN-statistics term is not at its minimum.
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])
    # Larger weights: the classifier terms' pixel gradients must dominate the l1 term's, whose sign
    # at the start (x = query up to round-off) is round-off on either side.
    variables["params"] = jax.tree_util.tree_map(lambda a: a * 2.0, variables["params"])
    apply_fn = classifier_apply(cfg)
    x = _images(6, cfg.image_shape, 1)
    d = bench_disc.parity(6, (apply_fn, variables, cfg, TwinCNN(variables, cfg), x, torch), steps_checked=(2,))
    assert d["loss_start"] <= bench_disc.TOL["loss_start"]
    assert d["x_cf_2_steps"] <= bench_disc.TOL["x_cf_3_steps"]  # the 3-step bound; 1 and 3 steps: the slow test
    assert d["loss_start_mean"] > 1.0  # a real loss (CE to another class + priors), not zeros


@pytest.mark.slow
def test_shipped_models_match_their_twins():
    """The benchmarks' own parity on the shipped checkpoints (what every benchmark asserts first)."""
    bench_ecinn.parity(16)
    bench_ecinn.parity(16, bench_ecinn.load(bench_ecinn.IBINN_MODEL), *bench_ecinn.cli_settings())
    bench_disc.parity(8)
    bench_train_flow.parity(8)


def test_bench_cli_names_missing_checkout(monkeypatch, capsys, tmp_path):
    """cfjax bench outside a checkout: one clear line, exit 2; bad options likewise."""
    from cfjax import cli
    from cfjax.pipelines import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site" / "cfjax" / "pipelines" / "bench.py"))
    assert cli.main(["bench", "ecinn", "--quick"]) == 2
    assert "repository checkout" in capsys.readouterr().err
    assert cli.main(["bench", "ecinn", "--budget", "-1"]) == 2


def test_bench_runs_the_checkouts_benchmarks_in_a_subprocess(monkeypatch, tmp_path):
    """cfjax bench = python -m benchmarks.run from the checkout, with options its parser accepts."""
    import argparse

    from benchmarks import run as bench_run
    from cfjax import cli
    from cfjax.pipelines import bench

    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda argv, cwd, env: calls.append((argv, cwd, env)) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "disc", "--quick", "--sizes", "4,8", "--repeats", "2", "--out-dir", str(tmp_path / "r")]) == 0
    (argv, cwd, env), = calls
    assert argv[:3] == [sys.executable, "-m", "benchmarks.run"] and (Path(cwd) / "benchmarks" / "run.py").is_file()
    assert str(cwd) in env["PYTHONPATH"].split(os.pathsep)
    p = argparse.ArgumentParser()
    bench_run.add_arguments(p)
    a = p.parse_args(argv[3:])
    assert (a.which, a.quick, a.sizes, a.repeats, a.out_dir) == ("disc", True, (4, 8), 2, str(tmp_path / "r"))
