"""Dependencies point one way: train -> torch_bridge -> jaxdsc. Checked on the source (ast), not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere (module level, functions, try blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).partition(".")[0])  # importlib.import_module("train.x")
    return found


@pytest.mark.parametrize(("package", "forbidden"), [("torch_bridge", {"train"}), ("jaxdsc", {"train", "torch_bridge"})])
def test_no_import_against_the_direction(package, forbidden):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & forbidden) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_checker_sees_nested_and_relative_free_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    try:\n        from train.model import x\n    except ImportError:\n        pass\n"
                   "import importlib\nimportlib.import_module('train.config')\nimport torch_bridge.cli as c\n")
    assert {"train", "torch_bridge", "importlib"} <= imported_packages(src)
