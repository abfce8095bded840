"""The docs cover what the code provides (after datasette's test_plugin_hooks_are_documented)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blktx import docgen
from blktx.cli import build_parser
from blktx.plugins import load

ROOT = Path(__file__).parent.parent


def test_generated_docs_are_up_to_date() -> None:
    assert docgen.main(["--check"]) == 0, "run python -m blktx.docgen"


@pytest.mark.parametrize("hook", docgen.hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert f"## `{hook}`" in text
    section = text.split(f"## `{hook}`", 1)[1].split("\n## ", 1)[0]
    assert "(undocumented)" not in section and len(section) > 200


def test_every_builtin_type_is_documented() -> None:
    text = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    builtin = {n for n, t in load().types.items() if type(t.instance).__module__.startswith("blktx_plugins.")}
    assert builtin and not [n for n in builtin if f"`{n}`" not in text]


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert not [c for c in commands if f"blktx {c}" not in readme]


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "HYPOTHESIS_PROFILE=ci python3 -m pytest"
    assert command in readme and ci.rstrip().endswith(command)
