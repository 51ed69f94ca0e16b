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


def _private_uses(path: Path) -> list[str]:
    """``name._private`` where ``name`` was imported from cfjax (a module, class or function)."""
    tree = ast.parse(path.read_text(), str(path))
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "cfjax":
            bound.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "cfjax")
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
            and node.attr.startswith("_") and not node.attr.startswith("__")]


def test_nothing_reaches_into_a_private_name_of_cfjax():
    """cfjax's modules, the benchmarks and the examples use cfjax's public names only (the
    attribute form of the import rule above: ``disc._stage_jit`` is as private as importing it)."""
    files = [p for d in ("cfjax", "benchmarks", "examples") for p in sorted((ROOT / d).rglob("*.py"))]
    bad = [use for p in files for use in _private_uses(p)]
    assert not bad, bad


def test_the_private_name_check_can_fail(tmp_path, monkeypatch):
    f = tmp_path / "uses.py"
    f.write_text("from cfjax.methods import disc\nimport cfjax.methods.ecinn\nx = disc._Spec\ny = cfjax.__name__\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _private_uses(f) == ["uses.py:3 disc._Spec"]


def _raise_messages(tree) -> list[tuple[str, int]]:
    """The message template of every ``raise SomeError("...")`` (f-string fields as {})."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            a = node.exc.args[0]
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                out.append((a.value, node.lineno))
            elif isinstance(a, ast.JoinedStr):
                out.append(("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in a.values), node.lineno))
    return out


def test_no_error_message_is_written_more_than_twice():
    """One home per check: the same error text at three or more sites means a copied check."""
    seen: dict[str, list[str]] = {}
    for path, tree in _modules():
        for text, line in _raise_messages(tree):
            seen.setdefault(text, []).append(f"{path.relative_to(ROOT)}:{line}")
    copies = {text: sites for text, sites in seen.items() if len(sites) > 2}
    assert not copies, copies
    assert _raise_messages(ast.parse("def f(x):\n    raise ValueError(f'bad {x}')\n")) == [("bad {}", 2)]
