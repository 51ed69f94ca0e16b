"""examples/reproduce.py: clear failures fast; the --quick smoke run is marked slow."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_section_is_one_line_exit_2(tmp_path, capsys):
    code = _module().main(["--out", str(tmp_path / "docs"), "--sections", "ecinn,bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bogus" in err[0]
    assert not (tmp_path / "docs").exists()


def test_missing_tfds_dataset_fails_clearly_when_strict(tmp_path, capsys):
    empty = tmp_path / "tfds"
    empty.mkdir()
    args = ["--out", str(tmp_path / "docs"), "--work", str(tmp_path / "work"), "--sections", "extra",
            "--extra-datasets", "fashion_mnist", "--data-dir", str(empty)]
    code = _module().main(args + ["--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("reproduce: error: fashion_mnist") and str(empty) in err[0]
    assert not (tmp_path / "docs" / "results.md").exists()
    # without --strict it is reported as not run, with the same reason
    assert _module().main(args) == 0
    md = (tmp_path / "docs" / "results.md").read_text()
    assert "**fashion_mnist**: not run." in md and str(empty) in md
    assert not (tmp_path / "work").exists()  # nothing was trained


@pytest.mark.slow
def test_quick_smoke_run(tmp_path):
    out = tmp_path / "docs"
    assert _module().main(["--quick", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    md = (out / "results.md").read_text()
    for heading in ("generative classifier", "ECINN counterfactuals", "ECINNh heatmaps", "DISC ablation",
                    "Decision-boundary", "FakeMNIST", "fashion_mnist and cifar10"):
        assert heading in md, heading
    for fig in ("ecinn_step_rules", "heatmaps_deletion_insertion", "disc_ablation", "boundary_ecinn", "boundary_disc",
                "fakemnist_ecinn", "fakemnist_disc"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig
