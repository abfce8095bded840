"""docs/plugin-tutorial.md builds examples/blktx-plugin-example from nothing.

Its annotated code blocks are checked against the example package (so the two
never drift), then the tutorial is followed for real: its files written into an
empty folder, a ``--system-site-packages`` venv, ``pip install -e`` offline,
``python -m blktx types``, the spec of step 5 checked, run, rolled back and
recovered, and the package's own tests (the conformance kit) run with the venv's
Python. Everything is installed into the venv only, never into this environment.

Annotations: ``<!-- file: PATH -->`` before a block that is a whole file of the
package, ``<!-- excerpt: PATH -->`` before a part of one (verbatim), and
``<!-- play: NAME -->`` before a spec of step 5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "plugin-tutorial.md"
EXAMPLE = ROOT / "examples" / "blktx-plugin-example"
_MARK = re.compile(r"^<!-- (file|excerpt|play): (\S+) -->$")
#: What ``pip install -e`` and pytest leave in the example's folder: not files of the package.
_GENERATED = ("build", "__pycache__", ".pytest_cache", ".hypothesis")


def blocks(kind: str) -> list[tuple[str, str]]:
    """The (path, text) of every code block annotated ``<!-- KIND: path -->``."""
    lines = TUTORIAL.read_text().splitlines(keepends=True)
    found = []
    for n, line in enumerate(lines):
        mark = _MARK.match(line.rstrip("\n"))
        if mark is None or mark.group(1) != kind:
            continue
        assert lines[n + 1].startswith("```"), f"plugin-tutorial.md:{n + 1}: {mark.group(0)} is not followed by a code block"
        end = next(i for i in range(n + 2, len(lines)) if lines[i].rstrip("\n") == "```")
        found.append((mark.group(2), "".join(lines[n + 2 : end])))
    return found


def package_files() -> set[str]:
    """The example package's own files (sources and pyproject), relative to it."""
    return {
        str(p.relative_to(EXAMPLE))
        for p in EXAMPLE.rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".toml")
        and not any(part in _GENERATED or part.endswith(".egg-info") for part in p.relative_to(EXAMPLE).parts)
    }


def test_every_file_shown_is_the_example_file_and_every_file_is_shown() -> None:
    shown = blocks("file")
    paths = [path for path, _ in shown]
    assert len(paths) == len(set(paths)), f"a file is shown twice: {paths}"
    for path, text in shown:
        assert (EXAMPLE / path).is_file(), f"the tutorial shows {path}, which examples/blktx-plugin-example lacks"
        assert text == (EXAMPLE / path).read_text(), f"the tutorial's {path} differs from examples/blktx-plugin-example/{path}"
    assert set(paths) == package_files(), "the tutorial must show every file of the example package, whole"


def test_every_excerpt_is_verbatim_in_its_file() -> None:
    excerpts = blocks("excerpt")
    assert excerpts
    for path, text in excerpts:
        assert text in (EXAMPLE / path).read_text(), f"an excerpt of {path} is not in the file as shown:\n{text}"


# -- the tutorial, followed ------------------------------------------------------------


class Followed:
    """The tutorial's package in a folder of its own, installed in a venv of its own."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.package = top / "blktx-file-snapshot"
        self.venv = self.package / ".venv"
        self.python = str(self.venv / "bin" / "python")
        self.play = top / "play"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BLKTX_", "PIP_", "VIRTUAL_ENV"))}
        self.env |= {
            "BLKTX_JOURNAL": str(top / "journal.sqlite"),
            "BLKTX_LOCK_DIR": str(top / "locks"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "COLUMNS": "300",
        }

    def run(self, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=cwd, env=self.env | env, capture_output=True, text=True, check=False, timeout=600)

    def blktx(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``python -m blktx ARGS`` with the venv's Python, in the play folder (the tutorial's step 5)."""
        return self.run(self.python, "-m", "blktx", *args, cwd=self.play, **env)


def _ok(out: subprocess.CompletedProcess[str], code: int = 0) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == code, f"{' '.join(map(str, out.args))}: exit {out.returncode}, not {code}:\n{text}"
    return " ".join(text.split())  # one line: a record wrapped for the terminal still matches


@pytest.fixture(scope="module")
def followed(tmp_path_factory: pytest.TempPathFactory) -> Followed:
    f = Followed(tmp_path_factory.mktemp("blktx-tutorial"))
    for path, text in blocks("file"):  # step 1 to 3: the files, in an empty folder
        (f.package / path).parent.mkdir(parents=True, exist_ok=True)
        (f.package / path).write_text(text)
    _ok(f.run(sys.executable, "-m", "venv", "--system-site-packages", str(f.venv), cwd=f.package))
    assert not (f.venv / "bin" / "blktx").exists(), "a --system-site-packages venv has no blktx script of its own"
    # step 4, offline: no index, the build backend (setuptools) and blktx from the system's site-packages
    pip = [str(f.venv / "bin" / "pip"), "install", "--no-index", "--no-cache-dir", "--no-deps", "--no-build-isolation"]
    _ok(f.run(*pip, "-e", str(f.package), cwd=f.package))
    f.play.mkdir()
    return f


def test_the_venv_sees_the_tutorials_package_and_this_environment_does_not(followed: Followed) -> None:
    where = "import importlib.util as u; s = u.find_spec('blktx_file_snapshot'); print(s.origin if s else '-')"
    venv = _ok(followed.run(followed.python, "-c", where, cwd=followed.top))
    assert venv.startswith(str(followed.package)), f"the venv imports the plugin from {venv}, not the tutorial's folder"
    mine = _ok(followed.run(sys.executable, "-c", where, cwd=ROOT))
    entry_points = (
        "from importlib.metadata import entry_points as e; print([p.dist.read_text('direct_url.json') for p in e(group='blktx')])"
    )
    mine += _ok(followed.run(sys.executable, "-c", entry_points, cwd=ROOT))
    assert str(followed.top) not in mine, f"the tutorial's package leaked into this environment: {mine}"


def test_blktx_types_lists_the_new_type(followed: Followed) -> None:
    listed = _ok(followed.blktx("types"))
    assert "file.snapshot (plugin file) - Snapshot a plain file by reflink (or copy) next to it." in listed, listed
    report = json.loads(followed.blktx("types", "--json").stdout)
    assert {"name": "file.snapshot", "plugin": "file"}.items() <= next(
        t for t in report["types"] if t["name"] == "file.snapshot"
    ).items()
    assert [p for p in report["problems"] if p["plugin"] == "file"] == []  # other plugins' problems are theirs


def test_the_specs_check_run_refuse_roll_back_and_recover(followed: Followed) -> None:
    play = followed.play
    for name, text in blocks("play"):
        (play / name).write_text(text)
    with open(play / "vm1.raw", "wb") as raw:  # truncate -s
        raw.truncate(1 << 20)
    (play / "vm1.conf").write_text("memory = 1G\n")
    assert "check passed" in _ok(followed.blktx("check", "nightly.toml"))
    assert "committed" in _ok(followed.blktx("run", "nightly.toml"))
    assert (play / "vm1.conf.nightly").read_text() == "memory = 1G\n"
    assert (play / "vm1.raw.nightly").stat().st_size == 1 << 20
    again = _ok(followed.blktx("run", "nightly.toml"), code=2)
    assert "vm1.raw.nightly already exists (hint: choose another dest)" in again, again
    assert "complete" in _ok(followed.blktx("list", "--verify"))
    before = sorted(p.name for p in play.iterdir())
    assert "rolled back" in _ok(followed.blktx("run", "drill.toml"), code=1)
    assert sorted(p.name for p in play.iterdir()) == before
    _ok(followed.blktx("run", "drill.toml", BLKTX_CRASH_AFTER="5"), code=-9)
    assert {"vm1.raw.drill", "vm1.conf.drill"} <= {p.name for p in play.iterdir()}, "the crash came after both snapshots"
    assert "rolled back" in _ok(followed.blktx("recover"))
    assert sorted(p.name for p in play.iterdir()) == before


def test_the_package_passes_the_kit(followed: Followed) -> None:
    out = _ok(followed.run(followed.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests", cwd=followed.package))
    assert " passed" in out and "not installed as an entry point" not in out, out  # the crash-and-recover property ran
