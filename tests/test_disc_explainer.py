"""cfjax.DISCExplainer: DISC in one call, for the shipped models and for any Flax classifier."""

import numpy as np
import pytest

import cfjax
from cfjax.data import load_dataset
from cfjax.methods.disc import DISCConfig

FAST = DISCConfig(prior="pixels", steps=60, fit_steps=0, stages=(0.5, 0.9), jitter=0)  # jitter needs more steps


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_pretrained_one_call_with_next_and_per_query_targets():
    x = load_dataset("mnist5k", "test").images[:8]
    ex = cfjax.DISCExplainer.pretrained("mnist5k", config=FAST)
    out = ex.explain(x, target="next")
    assert out["x_cf"].shape == x.shape and 0 <= out["x_cf"].min() and out["x_cf"].max() <= 1
    np.testing.assert_array_equal(out["y_target"], (ex.predict(x) + 1) % 10)
    np.testing.assert_array_equal(out["y_cf_pred"], ex.predict(out["x_cf"]))
    assert np.mean(out["y_cf_pred"] == out["y_target"]) >= 0.75
    t = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    own = cfjax.DISCExplainer(ex.apply_fn, ex.variables, FAST, ex.duq).explain(x, target=t)
    np.testing.assert_array_equal(own["y_target"], t)


def test_bad_settings_are_refused():
    with pytest.raises(cfjax.CfjaxError, match="DISCConfig"):
        cfjax.DISCExplainer(lambda v, x: x, {}, config={"steps": 3})
    ex = cfjax.DISCExplainer.pretrained("mnist5k", manifold=False, config=FAST)
    x = load_dataset("mnist5k", "test").images[:2]
    with pytest.raises(cfjax.CfjaxError):
        ex.explain(x, target=np.array([1, 10]))


def test_pretrained_defaults_are_the_clis_for_the_dataset():
    """Without a config, DISCExplainer.pretrained takes what `cfjax explain disc --data mnist5k`
    takes: the library defaults with the "strokes" image priors; an own model keeps the plain ones."""
    from cfjax.methods.disc import styled

    ex = cfjax.DISCExplainer.pretrained("mnist5k", manifold=False)
    assert ex.config == styled(DISCConfig(), "strokes") and ex.config.lambda_frame > 0
    assert cfjax.DISCExplainer(ex.apply_fn, ex.variables).config == DISCConfig()
