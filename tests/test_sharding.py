"""Sharded generation over 8 forced CPU devices gives the single-device results."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    assert jax.local_device_count() == 8, jax.local_devices()
    from cfjax.data import load_dataset
    from cfjax.pipelines.explain_ecinn import explain_arrays
    from cfjax.pipelines.train_flow import load_flow
    from cfjax.pretrained import default_model_dir
    params, config, _ = load_flow(default_model_dir("flow", "mnist5k"))
    x = load_dataset("mnist5k", "test").images[:21]          # not a multiple of 8: padding
    one = explain_arrays(params, config, x, "next", devices=1, batch_size=16)
    eight = explain_arrays(params, config, x, "next", devices=8, batch_size=16)
    for k in one:
        np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert (one["y_cf_pred"] == one["y_target"]).mean() > 0.9
    try:
        explain_arrays(params, config, x, "next", devices=9)
        raise SystemExit("no error for 9 devices")
    except Exception as e:
        assert "only 8 local device" in str(e), e
    print("SHARDING-OK")
    """
)


def test_eight_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "SHARDING-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
