"""The roofline helper (benchmarks.roofline): FLOP counts against known values and XLA's count,
loops counted by their trip count, the YNNPACK fusion flag leaving XLA's count alone, and the
row annotation."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import roofline as rf

REPO = Path(__file__).resolve().parents[1]


def conv(x, w, strides=(1, 1), padding="SAME", **kw):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def test_matmul_is_two_n_cubed_and_xla_agrees():
    n = 128
    a = jnp.ones((n, n))
    assert rf.jaxpr_flops(jnp.matmul, a, a)["flops"] == 2 * n**3
    assert rf.xla_flops(jnp.matmul, a, a) == pytest.approx(2 * n**3, rel=0.01)
    b = jnp.ones((4, n, 32))  # batched: 2 * 4 * n * 32 * n
    assert rf.jaxpr_flops(lambda b, a: jnp.einsum("bik,kj->bij", b.transpose(0, 2, 1), a), b, a)["dot_flops"] == 2 * 4 * 32 * n * n


@pytest.mark.parametrize("kw", [
    {},                                                                  # SAME: border taps on padding not counted
    {"strides": (2, 2), "padding": ((1, 0), (2, 1)), "rhs_dilation": (2, 1)},
    {"padding": ((2, 2), (2, 2)), "lhs_dilation": (2, 2)},             # a transposed conv: holes not counted
    {"padding": "VALID", "feature_group_count": 4},
])
def test_conv_count_equals_xla(kw):
    groups = kw.get("feature_group_count", 1)
    x, w = jnp.ones((3, 14, 14, 32)), jnp.ones((3, 3, 32 // groups, 16))
    count = rf.jaxpr_flops(lambda x, w: conv(x, w, **kw), x, w)
    assert count["flops"] == rf.xla_flops(lambda x, w: conv(x, w, **kw), x, w)
    assert count["dominant_conv"].flops() == count["flops"]


def test_same_conv_interior_is_dense():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
    valid = rf.jaxpr_flops(lambda x, w: conv(x, w, padding="VALID"), x, w)["flops"]
    assert valid == 2 * 2 * 6 * 6 * 8 * 4 * 9
    same = rf.jaxpr_flops(conv, x, w)["flops"]
    assert same == 2 * 2 * 8 * 4 * (8 * 3 - 2) ** 2  # taps per row: 3 inside, 2 at each border


def test_loops_are_counted_by_trip_count_where_xla_counts_once():
    n = 64
    a = jnp.ones((n, n))
    f = lambda a: jax.lax.fori_loop(0, 10, lambda i, x: x @ a, a)  # noqa: E731
    g = lambda a: jax.lax.scan(lambda x, _: (x @ a, None), a, None, length=7)[0]  # noqa: E731
    assert rf.jaxpr_flops(f, a)["flops"] == 10 * 2 * n**3
    assert rf.jaxpr_flops(g, a)["flops"] == 7 * 2 * n**3
    assert rf.xla_flops(f, a) == pytest.approx(2 * n**3, rel=0.05)  # why the jaxpr count is the roofline's
    w = lambda a: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ a, c[1] + 1), (a, 0))[0]  # noqa: E731
    c = rf.jaxpr_flops(w, a)
    assert c["while_loops"] == 1 and c["flops"] == 2 * n**3


def test_gradient_convs_and_dominant_forward_conv():
    x, w = jnp.ones((4, 14, 14, 8)), jnp.ones((3, 3, 8, 16))
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    c = rf.jaxpr_flops(grad, x, w)
    fwd = rf.jaxpr_flops(conv, x, w)["flops"]
    assert c["conv_flops"] == pytest.approx(3 * fwd, rel=0.02)  # forward, input gradient, weight gradient
    assert c["dominant_forward_conv"].is_forward_nhwc()
    assert c["dominant_forward_conv"].lhs_shape == (4, 14, 14, 8)
    assert rf.summary(c)["dominant_forward_conv"]["flops"] == fwd


def test_dead_code_is_not_counted():
    a = jnp.ones((32, 32))

    def f(a):
        _unused = a @ a @ a
        return a @ a

    assert rf.jaxpr_flops(f, a)["flops"] == 2 * 32**3


def test_xla_count_is_the_same_under_the_ynn_fusion_flag():
    """XLA's cost analysis still counts FLOPs with the flag cfjax sets for ECINN (a fresh process:
    XLA reads its flags once)."""
    code = ("import jax, jax.numpy as jnp; from benchmarks import roofline as rf; "
            "x, w = jnp.ones((8, 14, 14, 16)), jnp.ones((3, 3, 16, 16)); "
            "f = lambda x, w: jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + 1.0); "
            "print(rf.xla_flops(f, x, w), rf.jaxpr_flops(f, x, w)['flops'])")
    outs = []
    for flags in ("", "--xla_cpu_experimental_ynn_fusion_type=eltwise"):
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    assert outs[0] == outs[1]
    xla, ours = map(float, outs[0])
    assert ours <= xla <= ours * 1.02  # + bias and ReLU, one FLOP per element each


def test_ceilings_and_row_annotation():
    c = rf.jaxpr_flops(conv, jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)))["dominant_conv"]
    ceil = rf.ceilings(c, twin=False, repeats=1, n=64, log=lambda s: None)
    assert ceil["matmul"]["cfjax"]["flops"] == 2 * 64**3 and ceil["matmul"]["cfjax"]["gflop_s"] > 0
    assert ceil["dominant_conv"]["cfjax"]["flops"] == c.flops()
    rows = [{"batch": 2, "cfjax_s": 0.5, "twin_s": 1.0}, {"batch": 4, "skipped": True}]
    rf.annotate_rows(rows, lambda b: 1e9 * b, ceil)
    r = rows[0]
    assert r["flops_per_item"] == 1e9 and r["cfjax_gflop_s"] == pytest.approx(4.0) and r["twin_gflop_s"] == pytest.approx(2.0)
    assert r["cfjax_of_matmul_ceiling"] == pytest.approx(4.0 / ceil["matmul"]["cfjax"]["gflop_s"])
    assert "twin_of_conv_ceiling" not in r and "flops_per_item" not in rows[1]


def test_torch_conv_ceiling_computes_the_same_convolution():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x, w = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32), np.random.default_rng(1).normal(size=(3, 3, 3, 5)).astype(np.float32)
    for pad in ("SAME", ((1, 0), (0, 1))):
        spec = rf.jaxpr_flops(lambda x, w: conv(x, w, padding=pad), jnp.asarray(x), jnp.asarray(w))["dominant_conv"]
        assert rf.torch_conv_ceiling(spec, repeats=1)["flops"] == spec.flops()
        ref = np.asarray(conv(jnp.asarray(x), jnp.asarray(w), padding=pad)).transpose(0, 3, 1, 2)
        (pt, pb), (pl, pr) = spec.padding
        got = F.conv2d(F.pad(torch.as_tensor(x).permute(0, 3, 1, 2), (pl, pr, pt, pb)), torch.as_tensor(w).permute(3, 2, 0, 1))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_markdown_table_of_a_results_folder(tmp_path):
    import json

    ceil = {"matmul": {"cfjax": {"gflop_s": 100.0}, "twin": {"gflop_s": 120.0}},
            "dominant_conv": {"spec": {"describe": "3x3 conv 8->8"}, "cfjax": {"gflop_s": 50.0}, "twin": {"gflop_s": 40.0}}}
    row = {"batch": 4, "flops_per_item": 5e8, "cfjax_step_images_per_s": 80.0, "twin_step_images_per_s": 40.0, "speedup": 2.0,
           "cfjax_gflop_s": 8.0, "twin_gflop_s": 4.0, "cfjax_of_conv_ceiling": 0.16, "twin_of_conv_ceiling": 0.1}
    res = {"rows": [row, {"batch": 8, "skipped": True}], "headline": {"batch": 4}, "settings": {"steps_per_call": 5},
           "roofline": {"ceilings": ceil, "count_at_headline": {"dominant_forward_conv_share": 0.25},
                        "interleaved_at_headline": {"cfjax": {"program_gflop_s": 8.0, "conv_gflop_s": 50.0, "matmul_gflop_s": 100.0,
                                                              "program_of_conv": 0.16, "program_of_matmul": 0.08}}}}
    (tmp_path / "disc_cpu.json").write_text(json.dumps(res))
    table = rf.markdown_table(tmp_path)
    assert "| disc | 4 | 100.0 | 80 | 40 | 2.00x | 8.0 | 4.0 | 0.16 | 0.10 |" in table  # MFLOP per step-image: 500 / 5
    assert "batch 8" not in table and "program = 0.16 of the conv" in table
