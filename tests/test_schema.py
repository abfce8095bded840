"""The JSON Schema and the validator agree: a property test feeds generated specs to both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktx import InvalidTransaction
from blktx.cli import main
from blktx.plugins import default_registry
from blktx.schema import schema
from blktx.spec import from_document, parse_spec

REGISTRY = default_registry()
VALIDATOR = jsonschema.Draft202012Validator(schema(REGISTRY))
TYPES = [
    "sim.snapshot",
    "sim.overlay",
    "sim.delete",
    "sim.noop",
    "fault",
    "exec",
    "qcow2.internal-create",
    "qmp.internal-create",
    "qmp.external-create",
]

ANY = st.one_of(
    st.integers(-2, 3),
    st.booleans(),
    st.floats(-1, 2, allow_nan=False),
    st.sampled_from(["", "x", "do", "tcp:x", "tcp:h:1"]),
    st.lists(st.sampled_from(["a", "b"]), max_size=2),
    st.lists(st.integers(0, 2), min_size=1, max_size=2),
    st.dictionaries(st.sampled_from(["K"]), st.sampled_from(["v"]), max_size=1),
    st.dictionaries(st.sampled_from(["K"]), st.integers(0, 1), min_size=1, max_size=1),
)


def good_value(kind: str, choices: Any) -> Any:
    return {
        "str": st.sampled_from(list(choices) if choices else ["a", "nightly"]),
        "path": st.sampled_from(["w.json", "d/x.qcow2"]),
        "address": st.sampled_from(["vm.qmp", "/run/vm/qmp.sock", "tcp:127.0.0.1:4444", "tcp:[::1]:4444"]),
        "int": st.integers(-1, 3),
        "float": st.floats(0, 5, allow_nan=False),
        "bool": st.booleans(),
        "list[str]": st.lists(st.sampled_from(["true", "x"]), min_size=1, max_size=2),
        "table[str]": st.dictionaries(st.sampled_from(["A", "B"]), st.sampled_from(["1"]), max_size=2),
    }[kind]


@st.composite
def valid_action(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from(TYPES))
    raw: dict[str, Any] = {"type": name}
    for p in REGISTRY.types[name].cls.params:
        if p.required or draw(st.booleans()):
            raw[p.name] = draw(good_value(p.kind, p.choices))
    return raw


@st.composite
def documents(draw: Any) -> dict[str, Any]:
    """A valid document, then (half the time) one thing made wrong somewhere."""
    doc: dict[str, Any] = {"version": 1, "action": draw(st.lists(valid_action(), min_size=1, max_size=3))}
    if draw(st.booleans()):
        doc["description"] = "nightly"
    if draw(st.booleans()):
        doc["options"] = {
            "jobs": draw(st.integers(1, 4)),
            "quiesce": draw(st.sampled_from(["none", "pause", "fsfreeze", "fsfreeze+pause"])),
            "retry_delay": draw(st.sampled_from([0, 0.5])),
            "qcow2": {},
        }
    if draw(st.booleans()):
        return doc
    where = draw(
        st.sampled_from(["version", "top", "description", "option", "action", "param", "unknown-param", "missing-param", "type"])
    )
    bad = draw(ANY)
    action = doc["action"][draw(st.integers(0, len(doc["action"]) - 1))]
    params = [p for p in REGISTRY.types[action["type"]].cls.params]
    if where == "version":
        doc["version"] = draw(st.sampled_from([2, "1", True, 1.0]))
    elif where == "top":
        doc[draw(st.sampled_from(["extra", "actions"]))] = bad
    elif where == "description":
        doc["description"] = draw(st.sampled_from([3, True, ["x"]]))
    elif where == "option":
        doc.setdefault("options", {})[draw(st.sampled_from(["jobs", "quiesce", "cancel_retries", "jbos"]))] = bad
    elif where == "action":
        doc["action"] = draw(st.sampled_from([[], "x", [1], [{"name": "x"}]]))
    elif where == "param" and params:
        action[draw(st.sampled_from([p.name for p in params]))] = bad
    elif where == "unknown-param":
        action[draw(st.sampled_from(["devise", "nmae"]))] = "x"
    elif where == "missing-param":
        required = [p.name for p in params if p.required]
        if required:
            del action[draw(st.sampled_from(required))]
    elif where == "type":
        action["type"] = draw(st.sampled_from(["sim.snapshto", "", 5]))
    return doc


@given(documents())
def test_schema_and_validator_agree(doc: dict[str, Any]) -> None:
    schema_ok = VALIDATOR.is_valid(doc)
    try:
        from blktx.spec import bind

        # confinement rules are not the schema's: allow what the rules would refuse
        bind(
            from_document(doc, base_dir="/tmp/blktx-schema"),
            REGISTRY,
            roots=["/tmp/blktx-schema"],
            vm_roots=["/"],
            allow_tcp=True,
            shared_folders=True,
        )
        validator_ok = True
    except InvalidTransaction as exc:
        validator_ok = False
        problems = [str(p) for p in exc.problems]
    assert schema_ok == validator_ok, (
        doc,
        None if validator_ok else problems,
        [e.message for e in VALIDATOR.iter_errors(doc)][:3],
    )


def test_schema_accepts_the_examples() -> None:
    import tomli

    for spec in sorted((Path(__file__).parent.parent / "specs" / "examples").glob("*.toml")):
        doc = tomli.loads(spec.read_text())
        assert VALIDATOR.is_valid(doc) == (spec.name != "invalid.toml"), spec.name


def test_schema_cli_lists_every_installed_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    items = written["properties"]["action"]["items"]
    assert {b["then"]["title"] for b in items["allOf"]} == set(REGISTRY.types) == set(items["properties"]["type"]["enum"])
    assert parse_spec("version = 1\n").raw == {"version": 1}


# -- what an editor says: one mistake, one message naming it ---------------------------------

ONE_MISTAKE = [
    ('version = 1\n[options]\njbos = 4\n[[action]]\ntype = "sim.noop"\nkey = "a"\n', "'jbos' was unexpected"),
    ('version = 1\n[[action]]\ntype = "sim.snapshto"\ndevice = "a"\nname = "n"\n', "is not one of"),
    (
        'version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimgae = "d.qcow2"\nname = "n"\n',
        "'imgae' was unexpected|'image' is a required property",
    ),
    ('version = 1\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = 7\n', "7 is not of type"),
    ('version = 1\n[[action]]\ntype = "fault"\nphase = "later"\n', "'later' is not one of"),
]


@pytest.mark.parametrize("text, expected", ONE_MISTAKE)
def test_one_mistake_gets_one_message_that_names_it(text: str, expected: str) -> None:
    import tomli

    errors = sorted(VALIDATOR.iter_errors(tomli.loads(text)), key=lambda e: e.path)
    assert errors, "the schema refuses it"
    messages = [e.message for e in errors]
    assert any(x in m for m in messages for x in expected.split("|")), messages
    assert not any("any of the schemas" in m or "is not valid under" in m for m in messages), messages


@pytest.mark.skipif(shutil.which("taplo") is None, reason="needs taplo (npm @taplo/cli), Even Better TOML's engine")
@pytest.mark.parametrize("text, expected", ONE_MISTAKE)
def test_taplo_names_the_mistake(tmp_path: Path, text: str, expected: str) -> None:
    import subprocess

    assert main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    (tmp_path / "t.toml").write_text(text)
    out = subprocess.run(
        ["taplo", "check", "--schema", f"file://{tmp_path / 's.json'}", str(tmp_path / "t.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    # every message (taplo repeats one per span) names the key and the mistake
    accepted = [x for e in expected.split("|") for x in (e, e.replace("'", '"'))]
    assert errors and all(any(x in e for x in accepted) for e in errors), errors
