from __future__ import annotations

import types
from pathlib import Path

import pytest

from blktx import Action, ActionType, Param, hookimpl
from blktx.plugins import Registry, load


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


def test_every_built_in_type_is_named_for_the_plugin_a_lazy_registry_imports() -> None:
    from blktx.plugins import BUILTIN_MODULE, BUILTIN_PREFIXES, entry_points

    built_in = {ep.name for ep in entry_points() if ep.value.startswith(BUILTIN_MODULE)}
    registry = load()
    owners = {name: entry.plugin for name, entry in registry.types.items() if entry.plugin in built_in}
    assert len(owners) >= 20 and {"qcow2", "qmp", "libvirt", "sim", "hostfs"} <= set(owners.values())
    for name, plugin in owners.items():
        prefix = name.split(".", 1)[0]
        assert BUILTIN_PREFIXES.get(prefix, prefix) == plugin, name


def test_a_lazy_registry_imports_a_built_in_plugin_only_when_asked_and_answers_as_an_eager_one() -> None:
    lazy, eager = load(lazy=True), load()
    assert "qcow2" in lazy.pending and "file.snapshot" in lazy.loaded, "other distributions' plugins always load"
    assert lazy.plugin_names() == eager.plugin_names()
    assert type(lazy.get("host.fsfreeze")).__name__ == "FsFreeze" and "hostfs" not in lazy.pending
    assert "qcow2" in lazy.pending, "asking for one type imports its plugin alone"
    for typo in ("qcow2.internal-craete", "qmp.snap", "nosuch.thing"):
        assert lazy.get(typo) is None
        assert lazy.unknown(typo) == eager.unknown(typo)
    assert sorted(lazy.types) == sorted(eager.types) and not lazy.pending


def test_check_and_run_import_only_the_plugins_of_their_types(tmp_path: Path) -> None:
    import subprocess
    import sys

    spec = tmp_path / "one.toml"
    spec.write_text('version = 1\n[options.qcow2]\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    probe = (
        "import sys\nfrom blktx.cli import main\ncode = main(sys.argv[1:])\n"
        "print(sorted(m for m in sys.modules if m.startswith('blktx_plugins.') and m.count('.') == 1))\n"
        "sys.exit(code)\n"
    )
    for command in (["check"], ["run", "--journal", str(tmp_path / "j.sqlite")], ["types"]):
        out = subprocess.run(
            [sys.executable, "-c", probe, *command, *([] if command == ["types"] else [str(spec)])],
            capture_output=True,
            text=True,
            check=False,
            env={**__import__("os").environ, "BLKTX_LOCK_DIR": str(tmp_path / "locks")},
        )
        assert out.returncode == 0, out.stdout + out.stderr
        imported = out.stdout.strip().splitlines()[-1]
        if command == ["types"]:
            assert "blktx_plugins.qcow2" in imported and "blktx_plugins.libvirt" in imported
        else:  # an options table of a pending plugin is still known to be a plugin's
            assert imported == "['blktx_plugins.sim']", (command, out.stdout)


def test_a_lazy_registry_calls_the_hooks_in_the_order_an_eager_one_does() -> None:
    """pluggy calls the plugin registered last first: imported in the order a spec names
    its types, a host.fsfreeze named after a postgres.backup froze the filesystem before
    ``pg_backup_start``'s checkpoint (which then waits for the thaw), where an eager
    registry calls postgres first whatever the spec's order."""

    class Observer:
        @hookimpl
        def blktx_quiesce(self, ctx: object, actions: object) -> None:
            return None

    hooks = ("blktx_quiesce", "blktx_resume", "blktx_resume_many", "blktx_cleanup", "blktx_register_action_types")

    def order(registry: Registry) -> dict[str, list[str]]:
        return {h: [i.plugin_name for i in getattr(registry.pm.hook, h).get_hookimpls()] for h in hooks}

    eager = load()
    eager.pm.register(Observer(), name="observer")
    for names in (["postgres.backup", "host.fsfreeze"], ["qmp.internal-create", "libvirt.snapshot", "exec"], ["sim.noop"]):
        lazy = load(lazy=True)
        lazy.pm.register(Observer(), name="observer")  # as cli's Progress: before the spec's types are asked for
        for name in names:
            assert lazy.get(name) is not None, name
        for hook, called in order(lazy).items():
            assert called == [p for p in order(eager)[hook] if p in called], (names, hook)


def test_a_type_whose_prefix_is_not_its_plugins_name_is_explained_by_its_plugin() -> None:
    """host.* types are plugin hostfs's: its import failure is the hint for them, and a
    guess from another plugin names the plugin, not the prefix."""
    from blktx.errors import PluginProblem

    registry = load()
    assert registry.unknown("host.fsfreez") == "did you mean 'host.fsfreeze'?"
    assert registry.unknown("exe") == "did you mean 'exec'?"
    registry.loaded.pop("host.fsfreeze")
    registry.problems.append(PluginProblem("hostfs", "failed to import blktx_plugins.hostfs: OSError: boom"))
    hint = registry.unknown("host.fsfreeze")
    assert hint == "plugin 'hostfs' did not load: failed to import blktx_plugins.hostfs: OSError: boom"
