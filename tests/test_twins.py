"""The PyTorch twins compute the same functions as cfjax (the parity every benchmark asserts first).

Small batches; each parity function raises AssertionError with the measured differences when a
tolerance (stated in the benchmark module and written into its results JSON) is exceeded.
"""

import os
import sys

import numpy as np
import pytest

# torch and FrEIA come with the test extra: pip install -e '.[test]'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import bench_disc, bench_ecinn, bench_train_flow  # noqa: E402

torch.set_num_threads(1)  # small batches on shared cores: one thread is the fast setting


@pytest.fixture(scope="module")
def flow():
    return bench_ecinn.load()


def test_ecinn_twin_matches_cfjax(flow):
    d = bench_ecinn.parity(8, flow)
    assert d["latent_z"] <= bench_ecinn.TOL["latent_z"] and d["x_cf"] <= bench_ecinn.TOL["x_cf"]
    assert d["same_refine_rounds"] and d["same_y_pred"]


def test_ecinn_parity_can_fail(flow):
    """A twin with one coupling weight changed must fail the parity check."""
    params, config, twin, images, _ = flow
    from benchmarks.twins.flow import TwinFlowClassifier

    bad = TwinFlowClassifier(params, config)
    coupling = [m for m in bad.inn.module_list if hasattr(m, "subnet")][3]
    with torch.no_grad():
        coupling.subnet[4].bias.add_(0.05)
    with pytest.raises(AssertionError, match="parity failed"):
        bench_ecinn.parity(8, (params, config, bad, images, torch))


def test_twin_is_built_from_freia_blocks(flow):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    twin = flow[2]
    assert isinstance(twin.inn, Ff.SequenceINN)
    kinds = {type(m) for m in twin.inn.module_list}
    assert {Fm.HaarDownsampling, Fm.ActNorm, Fm.Fixed1x1Conv, Fm.AffineCouplingOneSided} == kinds


def test_disc_twin_matches_cfjax():
    d = bench_disc.parity(4)
    assert d["loss_start"] <= bench_disc.TOL["loss_start"]
    assert d["loss_start_mean"] > 1.0  # a real loss (CE to another class + priors), not zeros


def test_training_twin_matches_cfjax():
    loaded = bench_train_flow.load()
    d = bench_train_flow.parity(4, loaded)
    assert d["loss"] <= bench_train_flow.TOL["loss"]
    assert d["grad_rel"] <= bench_train_flow.TOL["grad_rel"] and d["grad_max_abs"] > 0
    assert d["params_after_3_steps"] <= bench_train_flow.TOL["params_after_3_steps"] <= d["param_change"]
    assert d["update_rel_l2"] <= bench_train_flow.TOL["update_rel_l2"]


def test_bench_cli_names_missing_checkout(tmp_path, monkeypatch, capsys):
    """cfjax bench outside a checkout: one clear line, exit 2."""
    from cfjax import cli
    from cfjax.pipelines import bench

    def outside_checkout():
        raise bench.CfjaxError("cfjax bench runs from a cfjax repository checkout")

    monkeypatch.setattr(bench, "_import_benchmarks", outside_checkout)
    assert cli.main(["bench", "ecinn", "--quick"]) == 2
    assert "repository checkout" in capsys.readouterr().err
    assert cli.main(["bench", "ecinn", "--budget", "-1"]) == 2
