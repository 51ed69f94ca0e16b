"""Training-time rotations and scalings (cfjax.augment) against SciPy's affine resampling, and
through the flow trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from cfjax.augment import affine_params, affine_warp, check_affine, random_affine
from cfjax.errors import CfjaxError


def _scipy_warp(img, theta, scale):
    """Output pixel p = input at c + A^-1 (p - c), A = scale * rotation(theta), bilinear, zero outside."""
    a = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    ai = np.linalg.inv(a)
    c = (np.array(img.shape[:2]) - 1) / 2.0
    return ndi.affine_transform(img, ai, offset=c - ai @ c, order=1, mode="grid-constant", cval=0.0)


def test_affine_warp_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.random((4, 28, 20, 2)).astype(np.float32)  # non-square, two channels
    theta = np.array([0.3, -0.17, 0.0, 1.2], np.float32)
    scale = np.array([1.1, 0.9, 1.0, 0.75], np.float32)
    out = np.asarray(jax.jit(affine_warp)(jnp.asarray(x), jnp.asarray(theta), jnp.asarray(scale)))
    for b in range(4):
        for ch in range(2):
            np.testing.assert_allclose(out[b, :, :, ch], _scipy_warp(x[b, :, :, ch], theta[b], scale[b]), atol=1e-5)
    np.testing.assert_allclose(out[2], x[2], atol=1e-6)  # angle 0, scale 1: unchanged


def test_random_affine_draws_within_limits_and_is_deterministic():
    key = jax.random.PRNGKey(3)
    theta, scale = affine_params(key, 2000, 10.0, 0.1)
    assert np.all(np.abs(np.asarray(theta)) <= np.radians(10.0) + 1e-7) and np.ptp(np.asarray(theta)) > np.radians(19)
    assert np.all(np.abs(np.asarray(scale) - 1) <= 0.1 + 1e-7) and np.ptp(np.asarray(scale)) > 0.19
    x = jnp.asarray(np.random.default_rng(1).random((5, 28, 28, 1)), jnp.float32)
    out = random_affine(key, x, 10.0, 0.1)
    t, s = affine_params(key, 5, 10.0, 0.1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(affine_warp(x, t, s)))
    assert random_affine(key, x, 0.0, 0.0) is x


@pytest.mark.parametrize("rotate, scale, name", [(-1.0, 0.0, "augment_rotate"), (90.0, 0.0, "augment_rotate"),
                                                 (0.0, 1.0, "augment_scale"), (0.0, -0.1, "augment_scale")])
def test_check_affine_refuses_out_of_range(rotate, scale, name):
    with pytest.raises(CfjaxError, match=name):
        check_affine(rotate, scale)
