from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktx import ActionSpec, InvalidTransaction, Transaction, parse_spec
from blktx.spec import bind, load_spec

EXAMPLES = Path(__file__).parent.parent / "specs" / "examples"


def problems_of(text: str, registry, tmp_path: Path, **kw):
    spec = tmp_path / "t.toml"
    spec.write_text(text)
    with pytest.raises(InvalidTransaction) as info:
        bind(load_spec(str(spec)), registry, **kw)
    return info.value.problems


def test_every_error_is_reported_at_once_with_line_and_column(registry, tmp_path: Path) -> None:
    problems = problems_of((EXAMPLES / "invalid.toml").read_text(), registry, tmp_path)
    found = [(p.line, p.column, p.action, p.key) for p in problems]
    assert found == [
        (6, 1, None, "jbos"),
        (9, 1, 0, "type"),
        (13, 1, 1, "device"),
        (15, 1, 1, "devise"),
        (16, 1, 1, "name"),
        (20, 1, 2, "phase"),
    ]
    hints = {p.key: p.hint for p in problems}
    assert hints["jbos"] == "did you mean 'jobs'?"
    assert hints["type"] == "did you mean 'sim.snapshot'?"
    assert hints["devise"] == "did you mean 'device'?"
    assert all(p.file and p.file.endswith("t.toml") for p in problems)


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    spec = tmp_path / "broken.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "fault\n')
    with pytest.raises(InvalidTransaction) as info:
        load_spec(str(spec))
    (p,) = info.value.problems
    assert (p.line, p.file) == (3, str(spec)) and "not valid TOML" in p.message


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(InvalidTransaction) as info:
        load_spec(str(tmp_path / "nope.toml"))
    assert "cannot read the spec" in info.value.problems[0].message


def test_version_is_required_and_checked(registry, tmp_path: Path) -> None:
    (p,) = problems_of('[[action]]\ntype = "fault"\n', registry, tmp_path)
    assert "no version" in p.message
    (p,) = problems_of('version = 2\n[[action]]\ntype = "fault"\n', registry, tmp_path)
    assert "unsupported spec version 2" in p.message and p.line == 1


def test_relative_paths_resolve_against_the_spec(registry, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    spec = tmp_path / "sub" / "t.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "sim.snapshot"\nworld = "w.json"\ndevice = "a"\nname = "n"\n')
    actions, _ = bind(load_spec(str(spec)), registry)
    assert actions[0].params["world"] == str(tmp_path / "sub" / "w.json")


def test_paths_outside_the_roots_are_refused(registry, tmp_path: Path) -> None:
    text = 'version = 1\n[[action]]\ntype = "sim.snapshot"\nworld = "../w.json"\ndevice = "a"\nname = "n"\n'
    (sub := tmp_path / "sub").mkdir()
    problems = problems_of(text, registry, sub)
    assert "outside the allowed roots" in problems[0].message and problems[0].line == 4
    # --root widens it
    spec = sub / "t.toml"
    actions, _ = bind(load_spec(str(spec)), registry, roots=[str(tmp_path)])
    assert actions[0].params["world"] == str(tmp_path / "w.json")


def test_symlink_escapes_are_refused(registry, tmp_path: Path) -> None:
    (inside := tmp_path / "in").mkdir()
    (outside := tmp_path / "out").mkdir()
    os.symlink(outside, inside / "link")
    text = 'version = 1\n[[action]]\ntype = "sim.snapshot"\nworld = "link/w.json"\ndevice = "a"\nname = "n"\n'
    problems = problems_of(text, registry, inside)
    assert "outside the allowed roots" in problems[0].message


def test_python_and_toml_build_the_same_transaction(registry, tmp_path: Path) -> None:
    text = 'version = 1\n[options]\njobs = 3\n[[action]]\ntype = "sim.snapshot"\ndevice = "a"\nname = "n"\n'
    from_toml = parse_spec(text, file=str(tmp_path / "t.toml"))
    from_py = Transaction([ActionSpec("sim.snapshot", {"device": "a", "name": "n"})], {"jobs": 3}, base_dir=str(tmp_path))
    a1, o1 = bind(from_toml, registry)
    a2, o2 = bind(from_py, registry)
    assert [(a.type.name, a.params, a.target) for a in a1] == [(a.type.name, a.params, a.target) for a in a2]
    assert o1 == o2 and o1.jobs == 3


def test_bad_options_are_reported(registry, tmp_path: Path) -> None:
    problems = problems_of(
        'version = 1\n[options]\njobs = 0\nquiesce = "pasue"\n[[action]]\ntype = "fault"\n', registry, tmp_path
    )
    assert [p.key for p in problems] == ["jobs", "quiesce"]
    assert problems[1].hint == "did you mean 'pause'?"


# -- hostile input: any bytes end as a located refusal, never another exception -------------


_VALID = b'version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n[options]\njobs = 2\n'


def _mangle(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    for pos, piece in edits:
        pos = pos % (len(data) + 1)
        data = data[:pos] + piece + data[pos:]
    return data


@given(
    st.one_of(
        st.binary(max_size=2000),
        st.text(max_size=500).map(lambda t: t.encode("utf-8")),
        st.text(max_size=300).map(lambda t: t.encode("utf-16")),
        st.lists(
            st.tuples(
                st.integers(0, 200),
                st.sampled_from(
                    [b"\x00", b"\xff", b"[", b"{", b'"', b"\\u0000", b"=", b"\n", b"[[action]]\n", b"\xc3", b"]" * 50, b"[" * 800]
                ),
            ),
            max_size=6,
        ).map(lambda e: _mangle(_VALID, e)),
    )
)
def test_any_bytes_are_refused_with_a_location_or_bound(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    from blktx.plugins import default_registry

    path = tmp_path_factory.mktemp("spec") / "t.toml"
    path.write_bytes(data)
    try:
        tx = load_spec(str(path))
        bind(tx, default_registry())
    except InvalidTransaction as exc:
        assert exc.problems and all(p.file == str(path) or p.file is None for p in exc.problems)
