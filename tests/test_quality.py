"""The house style's promises, checked with the tests: mypy strict and ruff clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_mypy_strict_on_blktx_and_its_plugins() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_clean() -> None:
    out = subprocess.run(
        ["ruff", "check", "blktx", "blktx_plugins", "tests", "bench", "examples"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_modules_stay_small() -> None:
    for path in [*ROOT.glob("blktx/**/*.py"), *ROOT.glob("blktx_plugins/*.py")]:
        assert len(path.read_text().splitlines()) < 700, f"{path} is over 700 lines: split it by concept"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_format_clean() -> None:
    out = subprocess.run(
        ["ruff", "format", "--check", "blktx", "blktx_plugins", "tests", "bench", "examples", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_plugin_types_its_register_argument() -> None:
    """Issue 17 item 14: ``register`` is ``blktx.Register``, never ``Any``, in every built-in
    plugin and in the example package."""
    import ast

    files = [*ROOT.glob("blktx_plugins/*.py"), *ROOT.glob("examples/*/*/__init__.py")]
    seen = 0
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "blktx_register_action_types":
                seen += 1
                (arg,) = node.args.args
                assert arg.annotation is not None and ast.unparse(arg.annotation) == "Register", path
    assert seen >= 10, seen
