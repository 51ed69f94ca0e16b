"""examples/own_models.py: a user's own Flax classifier explained with DISC and a user's own flow
with ECINN, through the public API only."""

import ast
from pathlib import Path

import pytest

import cfjax

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_models.py"


def test_example_uses_only_public_names():
    tree = ast.parse(EXAMPLE.read_text())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "cfjax"}
    assert used and used <= set(cfjax.__all__), used - set(cfjax.__all__)
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("cfjax")]
    assert not imported, imported


@pytest.mark.slow  # out of the default suite for time (guide: ~10 min on 2 cores); run with -m slow
def test_own_classifier_with_disc_and_own_flow_with_ecinn(load_example):
    out = load_example("own_models").main(["--steps", "150", "--flow-steps", "150", "--disc-steps", "120", "--queries", "8"])
    assert out["disc"]["accuracy"] > 0.9 and out["ecinn"]["accuracy"] > 0.85
    assert out["disc"]["validity"] >= 0.75 and out["ecinn"]["validity"] >= 0.75
