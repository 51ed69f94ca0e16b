"""The house rules that keep the layering honest, checked on the source tree itself."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cfjax"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree):
    """(module, names) of every import in a module, absolute names only."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_ruff_passes():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_type_checker_passes():
    p = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_function_over_80_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long


def test_pure_layers_import_nothing_from_the_layers_above():
    bad = []
    for path, tree in _modules():
        rel = path.relative_to(PKG).parts
        if rel[0] not in ("models", "methods"):
            continue
        for module, _ in _imports(tree):
            if module == "cfjax.data" or module.startswith(("cfjax.pipelines", "cfjax.cli", "benchmarks")):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_no_module_imports_a_private_name_of_another():
    bad = [f"{path.relative_to(ROOT)}: from {module} import {name}"
           for path, tree in _modules() for module, names in _imports(tree) if module.startswith("cfjax")
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, bad


def test_cfjax_never_imports_benchmarks():
    bad = [str(path.relative_to(ROOT)) for path, tree in _modules()
           for module, _ in _imports(tree) if module.split(".")[0] == "benchmarks"]
    assert not bad, bad
