from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blktx.cli import main

EXAMPLES = Path(__file__).parent.parent / "specs" / "examples"


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    shutil.copytree(EXAMPLES, tmp_path / "ex")
    return tmp_path / "ex"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_commit_example(examples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, data = run_json(capsys, "run", str(examples / "sim-commit.toml"))
    assert status == 0 and data["outcome"] == "committed"
    world = json.loads((examples / "sim-world.json").read_text())["devices"]
    assert sorted(world["vda"]["snapshots"].values()) == ["nightly"]
    assert world["vdc"]["active"] == "vdc.nightly"


def test_fault_example_rolls_back_and_changes_nothing(examples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (examples / "sim-world.json").read_bytes()
    status, data = run_json(capsys, "run", str(examples / "sim-fault.toml"))
    assert status == 1 and data["outcome"] == "rolled back"
    assert data["failure"]["type"] == "fault" and data["failure"]["phase"] == "invalidate"
    assert json.loads((examples / "sim-world.json").read_bytes()) == json.loads(before)


def test_invalid_example_reports_every_error(examples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", str(examples / "invalid.toml")])
    out = capsys.readouterr().out
    assert status == 2
    assert out.count("error: ") == 6
    assert "invalid.toml:6:1: 'jbos': unknown option 'jbos' (hint: did you mean 'jobs'?)" in out


def test_check_touches_nothing(examples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (examples / "sim-world.json").read_bytes()
    status, data = run_json(capsys, "check", str(examples / "sim-commit.toml"))
    assert status == 0 and data["checked_only"] and len(data["actions"]) == 4
    assert (examples / "sim-world.json").read_bytes() == before


def test_check_reports_refusals(examples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = examples / "refused.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "nope"\nname = "x"\n')
    status, data = run_json(capsys, "check", str(spec))
    assert status == 2
    assert data["problems"][0]["message"] == "no device 'nope' in " + str(examples / "sim-world.json")
    assert data["problems"][0]["line"] == 2 and data["problems"][0]["action"] == 0


def test_types_lists_plugins_and_params(capsys: pytest.CaptureFixture[str]) -> None:
    status, data = run_json(capsys, "types")
    assert status == 0
    by_name = {t["name"]: t for t in data["types"]}
    assert by_name["sim.delete"]["finalize"] is True and by_name["sim.delete"]["plugin"] == "sim"
    assert {p["name"] for p in by_name["fault"]["params"]} == {"phase", "message"}


def test_graph_prints_mermaid_and_refuses_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "sim.snapshot"]) == 0
    assert "INVALIDATED --> CANCELED: cancel" in capsys.readouterr().out
    assert main(["graph", "sim.snapshto"]) == 2
    assert "did you mean 'sim.snapshot'?" in capsys.readouterr().err


def test_console_script_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "blktx.cli", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "needs recovery" in out.stdout and "--allow-exec" in out.stdout


def test_log_and_show_read_the_journal(examples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = str(tmp_path / "j.sqlite")
    assert main(["run", str(examples / "sim-fault.toml"), "--journal", journal]) == 1
    capsys.readouterr()
    status, data = run_json(capsys, "log", "--journal", journal)
    (tx,) = data["transactions"]
    assert status == 0 and tx["status"] == "ABORTED" and tx["file"] == str(examples / "sim-fault.toml")
    assert main(["show", tx["txid"][:14], "--journal", journal]) == 0
    text = capsys.readouterr().out
    assert f"transaction {tx['txid']}: rolled back" in text and "state ABORTED" in text
    assert "failure: action #3 (fault) on fault:#3 failed in invalidate: drill" in text
    assert "{" not in text and "pending: []" not in text and text.endswith("\n"), "people's words, no reprs"
    assert "sim:" in text and "undone" in text and "CANCELED" not in text and "drill" in text
    status, shown = run_json(capsys, "show", tx["txid"], "--journal", journal)
    states = {a["type"]: a["state"] for a in shown["actions"]}
    assert status == 0 and states["fault"] == "CANCELED" and not {"CREATED", "INVALIDATED"} & set(states.values())
    assert main(["show", "nope", "--journal", journal]) == 2
    assert "no single transaction matches 'nope'" in capsys.readouterr().err


def test_show_names_a_vm_left_paused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blktx import ActionSpec, Executor, Hold, Transaction, hookimpl
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker
    from blktx.plugins import load

    class Stuck:
        @hookimpl
        def blktx_quiesce(self, ctx, actions):
            ctx.holding([Hold("t.pause", "vm:[one]")])

        @hookimpl
        def blktx_resume(self, ctx, hold):
            raise RuntimeError("monitor not answering")

    journal = SqliteJournal(str(tmp_path / "j.sqlite"))
    result = Executor(load(extra=[("stuck", Stuck())]), journal=journal, locker=Locker()).run(
        Transaction([ActionSpec("sim.noop", {"key": "[a]"})], options={"quiesce": "pause"}, base_dir=str(tmp_path))
    )
    assert result.outcome == "needs recovery"
    assert main(["show", result.txid, "--journal", journal.path]) == 0
    text = capsys.readouterr().out
    assert "quiesced vm:[one] (t.pause): NOT resumed: `blktx recover` resumes it" in text
    assert "sim:noop/[a]" in text, "a target in brackets is printed, not read as markup"


def test_python_m_blktx_loads_no_plugin_from_the_current_folder(tmp_path: Path) -> None:
    import subprocess
    import sys

    dist = tmp_path / "evil-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[blktx]\nevil = evil_plugin\n")
    (tmp_path / "evil_plugin.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').close()\n")
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "types", "--json"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "PWNED").exists() and "evil" not in out.stdout


def test_markup_in_a_backend_message_is_printed_as_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "fault"\nphase = "do"\nmessage = "array says [/] and [bold]no[/bold]"\n'
    )
    assert main(["run", str(tmp_path / "t.toml")]) == 1
    out = capsys.readouterr().out
    assert "array says [/] and [bold]no[/bold]" in out


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe v\x00e\x00r\x00",
        "version = 1\n# caf\xe9\n".encode("latin-1"),
        b"version = 1\n" + b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n",
        b'version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a\\u0000b"\n',
        b"version = 1\x00\n",
    ],
)
def test_malformed_spec_bytes_exit_2_with_a_located_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    (tmp_path / "t.toml").write_bytes(content)
    for command in ("run", "check"):
        assert main([command, str(tmp_path / "t.toml")]) == 2
        captured = capsys.readouterr()
        assert str(tmp_path / "t.toml") in captured.out and "Traceback" not in captured.out + captured.err


def test_a_fifo_in_place_of_the_spec_is_refused_not_waited_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    os.mkfifo(tmp_path / "t.toml")
    assert main(["check", str(tmp_path / "t.toml")]) == 2
    assert "not a regular file" in capsys.readouterr().out


def blktx_cli(*args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "blktx", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_piped_output_keeps_one_record_per_line_and_columns_is_respected(tmp_path: Path) -> None:
    long_name = "n" * 150
    (tmp_path / "t.toml").write_text(
        f'version = 1\n[[action]]\ntype = "fault"\nphase = "check"\n'
        f'message = "the array refused {long_name} because of a long reason"\n'
    )
    out = blktx_cli("check", str(tmp_path / "t.toml"), env={"COLUMNS": ""})
    assert out.returncode == 2
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("error:")]
    assert long_name in line and "long reason" in line, "one problem, one line"
    narrow = blktx_cli("check", str(tmp_path / "t.toml"), env={"COLUMNS": "60"})
    assert all(len(x) <= 60 for x in narrow.stdout.splitlines())


def test_a_spec_on_stdin_resolves_paths_against_the_current_folder(tmp_path: Path) -> None:
    from blktx_plugins.sim import make_world

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    spec = 'version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n'
    out = blktx_cli("run", "--json", "-", stdin=spec, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert str(tmp_path) in json.loads(out.stdout)["actions"][0]["target"]


def test_dev_stdin_and_a_process_substitution_read_as_stdin_does(tmp_path: Path) -> None:
    """``/dev/stdin`` (a redirected file or a pipe) and ``<(generate)`` are the caller's
    own descriptors: read whatever they are, relative paths against the current folder
    (not ``/dev``); a FIFO at a spec's path is still refused, never waited on."""
    import os
    import subprocess
    import sys

    from blktx_plugins.sim import make_world

    make_world(str(tmp_path / "sim-world.json"), ["a"])
    (tmp_path / "s.toml").write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n')
    blktx = f"{sys.executable} -m blktx run --json --journal j.sqlite"
    for how in (f"{blktx} /dev/stdin < s.toml", f"cat s.toml | {blktx} /dev/stdin", f"{blktx} <(cat s.toml)"):
        (tmp_path / "j.sqlite").unlink(missing_ok=True)
        make_world(str(tmp_path / "sim-world.json"), ["a"])
        out = subprocess.run(["bash", "-c", how], cwd=tmp_path, capture_output=True, text=True, check=False)
        assert out.returncode == 0, (how, out.stdout, out.stderr)
        assert str(tmp_path) in json.loads(out.stdout)["actions"][0]["target"], how
    os.mkfifo(tmp_path / "fifo.toml")
    out = blktx_cli("check", str(tmp_path / "fifo.toml"))
    assert out.returncode == 2 and "not a regular file" in out.stdout


def test_a_missing_relative_path_says_it_resolves_against_the_specs_folder(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "s.toml").write_text(
        'version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "vm/disk.qcow2"\nname = "n"\n'
    )
    out = blktx_cli("check", "specs/s.toml", cwd=tmp_path)
    assert out.returncode == 2
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("error:")]
    assert f"{tmp_path}/specs/vm/disk.qcow2 does not exist" in line
    assert f"relative paths in specs/s.toml resolve against its folder {tmp_path}/specs, not the current folder" in line
    out = blktx_cli("check", "s.toml", cwd=tmp_path / "specs")  # there, the current folder is the spec's
    assert "does not exist" in out.stdout and "resolve against" not in out.stdout


def test_description_is_stored_and_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = str(tmp_path / "j.sqlite")
    (tmp_path / "t.toml").write_text(
        'version = 1\ndescription = "nightly of the shop"\n[[action]]\ntype = "sim.noop"\nkey = "a"\n'
    )
    assert main(["run", str(tmp_path / "t.toml"), "--journal", journal]) == 0
    capsys.readouterr()
    _, data = run_json(capsys, "log", "--journal", journal)
    assert data["transactions"][0]["description"] == "nightly of the shop"
    assert main(["log", "--journal", journal]) == 0
    assert "nightly of the shop" in capsys.readouterr().out


def test_graph_of_a_finalize_type_has_no_cancel_and_help_is_per_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", "qcow2.internal-delete"]) == 0
    text = capsys.readouterr().out
    assert "cancel" not in text.split("---")[-1] and "finalize" in text
    assert main(["graph", "qcow2.internal-create"]) == 0
    assert "CANCELED: cancel" in capsys.readouterr().out
    assert "exit status" not in blktx_cli("types", "--help").stdout
    assert "exit status" in blktx_cli("run", "--help").stdout and "example:" in blktx_cli("show", "--help").stdout
    assert main(["graph", "qcow2.internal-creat"]) == 2
    assert "did you mean 'qcow2.internal-create'" in capsys.readouterr().err


def test_a_lock_refusal_names_the_spec_file_and_action(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blktx.locks import Locker

    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    holder = Locker().acquire("tx-holder", str(tmp_path / "other.sqlite"), ["sim:noop/a"])
    try:
        status, data = run_json(capsys, "run", str(tmp_path / "t.toml"), "--journal", str(tmp_path / "j.sqlite"))
    finally:
        Locker().release(holder, finished=True)
    (problem,) = data["problems"]
    assert status == 2 and problem["file"] == str(tmp_path / "t.toml") and problem["action"] == 0
    assert problem["line"] == 2


def test_a_failed_cancel_is_reported_in_text_with_its_state(tmp_path: Path) -> None:
    from blktx_plugins.sim import make_world

    make_world(str(tmp_path / "sim-world.json"), ["vda"])
    (tmp_path / "c.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.overlay"\ndevice = "vda"\nlayer = "ov1"\nfail = "invalidate"\nfail_cancel = true\n'
    )
    out = blktx_cli("run", "--journal", str(tmp_path / "j.sqlite"), str(tmp_path / "c.toml"))
    assert out.returncode == 3 and "cancel failed" in out.stdout and "left behind" in out.stdout, out.stderr
    assert "MarkupError" not in out.stderr


def test_a_command_built_alone_parses_and_helps_as_in_the_whole_parser() -> None:
    """main() builds only the given command's parser (start-up): each must be the same."""
    from blktx.cli import EXAMPLES, build_parser

    def sub(parser: Any, name: str) -> Any:
        return parser._subparsers._group_actions[0].choices[name]

    whole = build_parser()
    for name in EXAMPLES:
        assert sub(build_parser(name), name).format_help() == sub(whole, name).format_help(), name
    argv = ["run", "--json", "--wait", "3", "--jobs", "2", "--quiesce", "pause", "spec.toml"]
    assert vars(build_parser("run").parse_args(argv)) == vars(whole.parse_args(argv))


def test_a_spec_whose_paths_would_be_confined_to_slash_is_refused(tmp_path: Path) -> None:
    """A spec on standard input takes the current folder as its root; from / (a systemd
    unit's default) that would confine nothing: refused unless --root is given."""
    spec = 'version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n'
    out = blktx_cli("check", "-", stdin=spec, cwd=Path("/"))
    assert out.returncode == 2 and "confines nothing" in out.stdout and "--root" in out.stdout
    out = blktx_cli("check", "--root", str(tmp_path), "-", stdin=spec, cwd=Path("/"))
    assert out.returncode == 0, out.stdout


def test_only_the_callers_own_descriptors_are_read_as_stdin(tmp_path: Path) -> None:
    """``/dev/fd/N`` is a descriptor; ``/dev/fd/N/spec.toml`` (a file in a folder given as a
    descriptor) and ``/dev/stdin.toml`` are not: a FIFO there is refused, never waited on."""
    import os
    import subprocess
    import sys

    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "spec.toml")
    code = f"exec 5<{tmp_path / 'd'}; {sys.executable} -m blktx check /dev/fd/5/spec.toml"
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=20, check=False)
    assert out.returncode == 2 and "not a regular file" in out.stdout, out.stdout + out.stderr


def test_the_command_closes_its_journal_before_it_freezes_the_heap_for_exit(tmp_path: Path) -> None:
    """``entry`` (the ``blktx`` script, ``python -m blktx``) freezes the process's objects
    so that the exit skips their collection: the journal is closed first (checkpointed:
    no ``-wal`` left beside it), and the exit status is main's."""
    import subprocess
    import sys

    import tomli

    spec = tmp_path / "one.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    env = {**__import__("os").environ, "BLKTX_LOCK_DIR": str(tmp_path / "locks")}
    out = subprocess.run(
        [sys.executable, "-m", "blktx", "run", "--journal", str(tmp_path / "j.sqlite"), str(spec)], env=env, capture_output=True
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.glob("j.sqlite*")) == ["j.sqlite"]
    bad = subprocess.run([sys.executable, "-m", "blktx", "check", str(tmp_path / "missing.toml")], env=env, capture_output=True)
    assert bad.returncode == 2
    scripts = tomli.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["blktx"] == "blktx.cli:entry"
