"""examples/reproduce.py: clear failures fast; the --quick smoke run is marked slow."""

import pytest


def test_unknown_section_is_one_line_exit_2(tmp_path, capsys, load_example):
    code = load_example("reproduce").main(["--out", str(tmp_path / "docs"), "--sections", "ecinn,bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bogus" in err[0]
    assert not (tmp_path / "docs").exists()


def test_missing_tfds_dataset_fails_clearly_when_strict(tmp_path, capsys, load_example):
    empty = tmp_path / "tfds"
    empty.mkdir()
    args = ["--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work"), "--sections", "extra",
            "--extra-datasets", "fashion_mnist", "--data-dir", str(empty)]
    code = load_example("reproduce").main(args + ["--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("reproduce: error: fashion_mnist") and str(empty) in err[0]
    assert not (tmp_path / "docs" / "results.md").exists()
    # without --strict it is reported as not run, with the same reason
    assert load_example("reproduce").main(args) == 0
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "**fashion_mnist**: not run." in md and str(empty) in md
    assert not (tmp_path / "work").exists()  # nothing was trained


@pytest.mark.slow
def test_quick_smoke_run(tmp_path, load_example):
    out = tmp_path / "docs"
    assert load_example("reproduce").main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    md = (out / "results.md").read_text()
    for heading in ("generative classifier", "ECINN counterfactuals", "ECINNh heatmaps", "DISC ablation",
                    "Decision-boundary", "FakeMNIST", "fashion_mnist and cifar10"):
        assert heading in md, heading
    for fig in ("ecinn_step_rules", "heatmaps_deletion_insertion", "disc_ablation", "boundary_ecinn", "boundary_disc",
                "fakemnist_ecinn", "fakemnist_disc"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig


def test_reference_sections_render_every_row_with_intervals(load_example):
    cell = lambda r: {"rate": r, "ci95": [r - 0.01, r + 0.01], "n": 100}  # noqa: E731
    ref = {"queries": "Q", "model": "M", "step": "code", "refine": 2, "seconds": 1.0,
           "rows": {"authors GEN": {"validity": cell(0.99), "judge_rbf": cell(0.9), "judge_knn": cell(0.8), "judges_all_agree": cell(0.7),
                                    "study": {"elastic_net": {"mean": 99.0}, "im1": {"mean": 0.8}, "im2": {"mean": 0.1}, "fid": {"value": 3.0}}},
                    "cfjax ECINN": {"validity": cell(0.97), "judge_rbf": cell(0.6), "judge_knn": cell(0.5), "judges_all_agree": cell(0.4)}}}
    fake = {"model": "F", "queries": "FQ", "marker_switched": 0.9996, "marker_switched_ci95": [0.999, 0.9998],
            "authors_gen_marker_switched": 0.9998, "mean_abs_change": 0.02, "authors_gen_mean_abs_change": 0.0068}
    text = "\n".join(load_example("reproduce").reference_lines({"ecinn_reference": ref, "fakemnist_reference": {"ecinn": fake}}, {"date": "D"}))
    assert "| authors GEN | 99.0% (98.0%–100.0%) | 90.0% (89.0%–91.0%) |" in text and "| 99 | 0.8 | 0.1 | 3 |" in text
    assert "| cfjax ECINN | 97.0%" in text and "99.96% (95% interval 99.90%–99.98%)" in text


def test_ecinn_section_marks_the_cli_default_and_renders_judges(tmp_path, load_example):
    mod = load_example("reproduce")
    from cfjax.pipelines.explain_ecinn import DEFAULT_REFINE, DEFAULT_STEP

    rows = mod.step_rule_rows()
    assert rows.count((DEFAULT_STEP, DEFAULT_REFINE)) == 1 and ("paper", 0) in rows
    base = {"validity": 0.99, "oracle_agreement": 0.5, "latent_crossing": 1.0, "bits_per_dim": 4.0, "nn_distance": 5.0,
            "pca_error": 2.0, "l1_per_pixel": 0.1, "seconds_per_cf_compiled": 0.003, "oracle_accuracy_query": 0.99,
            "bits_per_dim_query": 4.4, "nn_distance_query": 4.9, "pca_error_query": 2.9, "judge_rbf": 0.9, "judge_knn": 0.8,
            "isolated_ink": 1.25}
    e_rows = [{**base, "step": s, "refine": r, "cli_default": (s, r) == (DEFAULT_STEP, DEFAULT_REFINE),
               "judge_rbf": 0.9 if (s, r) == (DEFAULT_STEP, DEFAULT_REFINE) else 0.4} for s, r in rows]

    class Args:
        out, work, quick, flow, classifier, oracle, duq = str(tmp_path), str(tmp_path), False, None, None, None, None

    meta = {"command": "c", "machine": "m", "date": "d", "seconds": 60.0, "quick": False, "flow": "f", "classifier": "c",
            "oracle": "o", "duq": "q"}
    md = mod.write_report(mod.Ctx(Args()), {"ecinn": {"n": 300, "rows": e_rows}}, meta).read_text()
    default_line = next(line for line in md.splitlines() if "**(CLI default)**" in line)
    assert default_line.startswith(f"| {DEFAULT_STEP} **(CLI default)** | {DEFAULT_REFINE} | 99.0% | 50.0% | 90.0% | 80.0% | 1.25 |")
    assert md.count("**(CLI default)**") == 1 and "| RBF | k-NN | lone px |" in md
    assert "read 90.0% / 80.0% of the counterfactuals" in md
    # an old results.json (no judges, ("short", 2) was the default) still renders
    old = [{k: v for k, v in r.items() if k not in ("judge_rbf", "judge_knn", "isolated_ink", "cli_default")} for r in e_rows]
    md = mod.write_report(mod.Ctx(Args()), {"ecinn": {"n": 300, "rows": old}}, meta).read_text()
    assert "| short **(CLI default)** | 2 |" in md and "lone px" not in md
