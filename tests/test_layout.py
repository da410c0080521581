"""The module layout's rules (docs/architecture.md, "Module map"), checked on the source.

Each rule keeps one kind of code in one place: the environment in env.py, argument
parsing in cli.py, flax in the model modules, orbax in checkpoint.py, matplotlib in
plots.py, tqdm in progress.py; and one import style. A module that breaks a rule is named in the failure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import o2v_jax

PACKAGE = Path(o2v_jax.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_are_absolute():
    relative = [p.name for p in MODULES
                if any(isinstance(n, ast.ImportFrom) and n.level > 0
                       for n in ast.walk(ast.parse(p.read_text())))]
    assert relative == []


@pytest.mark.parametrize("package, allowed", [
    ("argparse", {"cli.py"}),
    ("flax", {"encoders.py", "model.py"}),
    ("orbax", {"checkpoint.py"}),
    ("matplotlib", {"plots.py"}),  # optional: one module says what happens without it
    ("tqdm", {"progress.py"}),  # every bar is tqdm.auto, on by one rule
])
def test_one_module_owns_each_dependency(package, allowed):
    users = {p.name for p in MODULES if package in _imports(p)}
    assert users <= allowed, users - allowed


def test_library_reads_the_environment_only_through_env():
    """conventions item 2: one place. No other module touches os.environ or getenv."""
    offenders = [p.name for p in MODULES
                 if p.name != "env.py" and ("os.environ" in p.read_text() or "getenv" in p.read_text())]
    assert offenders == []
