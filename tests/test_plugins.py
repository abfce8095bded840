from __future__ import annotations

import types
from pathlib import Path

import pytest

from blktx import Action, ActionType, Param, hookimpl
from blktx.plugins import load


class Good(ActionType):
    """A well-formed type."""

    name = "good.thing"
    params = (Param("x", "int", default=1),)

    def target(self, action: Action) -> str:
        return "good"

    def do(self, action, ctx) -> None: ...

    def cancel(self, action, ctx) -> None: ...


class BadName(Good):
    name = "Bad Name"


class BadParam(Good):
    name = "bad.param"
    params = (Param("x", "complex"), Param("type"))


class NoCancel(ActionType):
    name = "bad.nocancel"

    def target(self, action: Action) -> str:
        return "x"

    def do(self, action, ctx) -> None: ...


def plugin(*classes: type) -> object:
    mod = types.SimpleNamespace()

    @hookimpl
    def blktx_register_action_types(register):
        for c in classes:
            register(c)

    mod.blktx_register_action_types = blktx_register_action_types
    return mod


def test_builtin_plugins_load_through_entry_points() -> None:
    registry = load()
    assert {"sim.snapshot", "sim.overlay", "sim.delete", "sim.noop", "fault"} <= set(registry.types)
    assert registry.types["fault"].plugin == "fault"
    assert registry.types["sim.snapshot"].plugin == "sim"


def test_malformed_types_are_reported_with_the_plugin_and_the_rest_still_load() -> None:
    registry = load(extra=[("mixed", plugin(BadName, Good, BadParam, NoCancel))])
    assert "good.thing" in registry.types and registry.types["good.thing"].plugin == "mixed"
    messages = [str(p) for p in registry.problems]
    assert len(messages) == 3 and all(m.startswith("plugin 'mixed'") for m in messages)
    assert "is not of the form 'plugin.verb'" in messages[0]
    assert "unknown kind 'complex'" in messages[1] and "'type' is reserved" in messages[1]
    assert "cancel() is not implemented" in messages[2]
    assert "sim.snapshot" in registry.types


def test_a_type_registered_twice_names_the_first_plugin() -> None:
    registry = load(extra=[("one", plugin(Good)), ("two", plugin(Good))])
    assert registry.types["good.thing"].plugin == "one"
    assert "already registered by plugin 'one'" in str(registry.problems[0])


def test_a_plugin_that_fails_to_import_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[blktx]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('missing libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load()
    (problem,) = [p for p in registry.problems if p.plugin == "broken"]
    assert "failed to import broken_plugin_mod" in problem.message and "missing libfoo" in problem.message
    assert "fault" in registry.types


def test_load_plugins_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTX_LOAD_PLUGINS", "fault")
    assert set(load().types) == {"fault"}
    monkeypatch.setenv("BLKTX_LOAD_PLUGINS", "")
    assert load().types == {}


def test_hook_tracing_writes_calls(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BLKTX_TRACE_HOOKS", "1")
    registry = load()
    registry.pm.hook.blktx_event(event=None)
    assert "blktx_event" in capsys.readouterr().err


def test_two_distributions_claiming_one_entry_point_name_is_an_error_naming_both(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    dist = tmp_path / "clash-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[blktx]\nqcow2 = clash_plugin\n")
    (tmp_path / "clash_plugin.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "types", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    data = json.loads(out.stdout)
    (problem,) = [p for p in data["problems"] if p["plugin"] == "qcow2"]
    assert "clash 1.0" in problem["message"] and "blktx " in problem["message"], problem
    assert not any(t["name"].startswith("qcow2.") for t in data["types"]), "neither silently wins"


def test_a_type_of_a_plugin_that_did_not_load_is_explained_never_swapped_for_a_live_one(tmp_path) -> None:
    """Issue 17 item 9: with the ``qcow2`` entry point claimed twice, a spec of
    ``qcow2.internal-create`` says the plugin did not load and why, and suggests no
    other plugin's type (``qmp.internal-create`` is a live VM's, not an image file's)."""
    import os
    import subprocess
    import sys

    dist = tmp_path / "clash-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[blktx]\nqcow2 = clash_plugin\n")
    (tmp_path / "clash_plugin.py").write_text("")
    (tmp_path / "s.toml").write_text('version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "a.qcow2"\nname = "n"\n')
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "check", str(tmp_path / "s.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert out.returncode == 2
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("error:")]
    assert "unknown action type 'qcow2.internal-create'" in line and "plugin 'qcow2' did not load" in line, line
    assert "clash 1.0" in line and "qmp." not in line, line


def test_a_guess_from_another_plugin_says_so() -> None:
    registry = load()
    assert registry.unknown("qcow2.internal-crate") == "did you mean 'qcow2.internal-create'?"
    hint = registry.unknown("qcwo2.internal-create")
    assert hint.startswith("did you mean 'qcow2.internal-create'?") and "a type of plugin 'qcow2', not 'qcwo2'" in hint
    assert registry.unknown("zzz.qqq") == "`blktx types` lists the installed types"
