"""examples/ecinn_reference.py: the judge row's per-target breakdown against a direct count."""

import numpy as np

from cfjax.data import load_dataset
from cfjax.models import judges

def test_judge_row_by_target_counts_agreement_and_lone_pixels_per_class(load_example):
    train = load_dataset("mnist5k", "train").take(600)
    js = {kind: judges.fit(kind, train.images, train.labels, 10) for kind in judges.KINDS}
    test = load_dataset("mnist5k", "test").take(40)
    x = np.array(test.images, np.float32)
    target = (np.asarray(test.labels) + np.arange(40) % 2) % 10  # half the targets are the true class
    x[0] = 0.0
    x[0, 10, 10] = 1.0  # one lone pixel, far from anything else
    x[1] = 0.0
    x[1, 5, 5] = x[1, 20, 20] = x[1, 5, 20] = 1.0  # three
    row = load_example("ecinn_reference").judge_row(js, x, target, None)
    both = np.all([judges.predict(js[k], x) == target for k in judges.KINDS], axis=0)
    lone = np.zeros(40)
    lone[0], lone[1] = 1, 3
    for i in range(2, 40):  # lone pixels of the real digits counted directly: > 0.3 with 8 neighbours averaging < 0.15
        g = np.pad(x[i, ..., 0], 1)
        for r in range(28):
            for c in range(28):
                if g[r + 1, c + 1] > 0.3 and (g[r:r + 3, c:c + 3].sum() - g[r + 1, c + 1]) / 8 < 0.15:
                    lone[i] += 1
    assert sorted(row["by_target"]) == sorted(set(target.tolist()))
    for t, cell in row["by_target"].items():
        sel = target == t
        assert cell["n"] == sel.sum()
        assert abs(cell["judges_all_agree"] - both[sel].mean()) < 1e-4
        assert abs(cell["isolated_ink"] - lone[sel].mean()) < 1e-3
    assert 0 < sum(c["judges_all_agree"] * c["n"] for c in row["by_target"].values()) < 40


def test_by_target_figure_picks_the_first_queries_of_each_target(load_example, tmp_path):
    mod = load_example("ecinn_reference")
    target = np.array([3, 1, -1, 3, 1, 3, 3, 0, 1])
    picks = mod.first_per_target(target, 2)
    assert list(picks) == [0, 1, 3]  # ascending, the skipped query (-1) left out
    for t, idx in picks.items():
        expected = [i for i in range(len(target)) if target[i] == t][:2]
        np.testing.assert_array_equal(idx, expected)
    rng = np.random.default_rng(0)
    x = rng.random((9, 28, 28, 1))
    out = tmp_path / "by_target.png"
    mod.by_target_figure(str(out), x, x[..., 0], x, np.zeros(9, int), target, per_class=2)
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > img.shape[0]  # 3 rows, 6 images per row
