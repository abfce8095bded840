"""Issue 17's points that had no test failing on the code it was filed against (6af8d4f).

Each test checks what the issue asks for through the command line or the kit, as a
user or a plugin author meets it, so that it fails on that code for the reason the
issue gives (not because a name cannot be imported).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def blktx(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m blktx ARGS`` with stdout a pipe (a log, not a terminal) and no $COLUMNS unless given."""
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [sys.executable, "-m", "blktx", *args], capture_output=True, text=True, cwd=cwd, env=base | env, check=False, timeout=300
    )


# -- item 1: a table fits an 80-column terminal and never splits a type's name ------------------


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")
def test_item1_the_table_fits_80_columns_and_keeps_the_type_whole(tmp_path: Path) -> None:
    folder = tmp_path / ("folder-of-the-virtual-machines-" * 3)
    folder.mkdir()
    image = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    (tmp_path / "t.toml").write_text(
        f'version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "{image}"\nname = "nightly"\n'
    )
    out = blktx("check", str(tmp_path / "t.toml"), COLUMNS="80")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    rows = [line.split("│") for line in lines if "│" in line]
    assert rows[0][1].strip() == "qcow2.internal-create", "the type is one word in one cell: " + "\n".join(lines)
    assert all(r[1].strip() in ("", "qcow2.internal-create") for r in rows), "no qcow2.internal-crea / te"
    assert "".join(r[2].strip() for r in rows) == str(image), "the target folds, whole, in its own column"


# -- item 3: recover and log say what run says ---------------------------------------------------


def test_item3_recover_and_log_use_the_words_of_run(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.sqlite")
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n[[action]]\ntype = "sim.noop"\nkey = "b"\n'
    )
    killed = blktx("run", str(tmp_path / "t.toml"), "--journal", journal, BLKTX_CRASH_AFTER="2")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    recovered = blktx("recover", "--journal", journal)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    (txid,) = [tx["txid"] for tx in json.loads(blktx("log", "--json", "--journal", journal).stdout)["transactions"]]
    assert f"{txid}: rolled back" in recovered.stdout and "rolled back (rolled back)" not in recovered.stdout, recovered.stdout
    logged = blktx("log", "--journal", journal).stdout
    (row,) = [line for line in logged.splitlines() if line.startswith(txid)]
    assert "rolled back" in row, f"blktx log says what run and recover say, not only ABORTED: {row}"


# -- item 11: a finalize type's cancel properties are not empty passes ---------------------------

FINALIZE_KIT = """
from blktx.testing import ActionTypeConformance
from blktx_plugins.sim import make_world, read_world


class TestSimDelete(ActionTypeConformance):
    type_name = "sim.delete"

    def setup_world(self, base):
        make_world(str(base / "sim-world.json"), {"a": {"snapshots": {"1": "old"}, "layers": ["a0"], "active": "a0"}})
        return {"device": "a", "name": "old"}

    def observe(self, base):
        return read_world(str(base / "sim-world.json"))
"""

CANCEL_PROPERTIES = (
    "test_do_then_cancel_restores_the_world",
    "test_invalidate_then_cancel_restores_the_world",
    "test_cancel_is_idempotent",
    "test_cancel_after_a_crash_works_from_the_journal",
)


def test_item11_the_cancel_properties_of_a_finalize_type_do_not_pass_empty(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_kit=FINALIZE_KIT)
    result = pytester.runpytest("-v", "-rs", "-p", "no:cacheprovider", "-k", "not every_crash_point")
    out = result.stdout.str()
    assert re.search(r"::test_check_has_no_side_effects PASSED", out), out  # the kit ran the type
    for name in CANCEL_PROPERTIES:
        assert not re.search(rf"::{name} PASSED", out), f"{name} passes for a finalize type it does not apply to:\n{out}"
        skipped = re.search(rf"::{name} SKIPPED", out)
        assert skipped or f"::{name}" not in out, out  # skipped with its reason, or deselected
    outcomes = result.parseoutcomes()
    assert outcomes.get("deselected", 0) + outcomes.get("skipped", 0) >= len(CANCEL_PROPERTIES), outcomes


# -- item 13: the docs say how a venv's blktx sees a plugin installed in the venv ----------------


def test_item13_plugins_md_says_a_system_site_packages_venv_runs_python_m_blktx() -> None:
    paragraphs = [" ".join(p.split()) for p in (ROOT / "docs" / "plugins.md").read_text().split("\n\n")]
    venv = [p for p in paragraphs if "--system-site-packages" in p]
    assert venv, "docs/plugins.md says nothing of a --system-site-packages venv"
    assert any("python -m blktx" in p and "does not see plugins" in p for p in venv), venv


# -- item 14: mypy --strict over both packages, whatever the config lists --------------------------


def test_item14_mypy_strict_over_blktx_and_blktx_plugins() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "blktx", "blktx_plugins"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- acceptance: `blktx run spec.toml > log` on a failing spec, every error one line -----------------


def test_acceptance_a_failing_run_in_a_log_has_every_error_on_one_line_by_file_and_line(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)  # every error is longer than the 160 columns logs were folded at
    deep.mkdir()
    shutil.copy(ROOT / "specs" / "examples" / "invalid.toml", deep / "spec.toml")
    spec = str(deep / "spec.toml")
    log = tmp_path / "log"
    with open(log, "w") as fh:  # blktx run spec.toml > log
        status = subprocess.run(
            [sys.executable, "-m", "blktx", "run", spec],
            stdout=fh,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
            check=False,
        ).returncode
    assert status == 2
    problems = json.loads(blktx("run", "--json", spec).stdout)["problems"]
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == len(problems) >= 2 and len(lines) == len(problems) + 1, lines  # the summary line
    for p in problems:
        (hit,) = [line for line in lines if f"{spec}:{p['line']}:" in line]  # grep spec.toml:LINE
        assert hit.startswith("error: ") and p["message"] in hit and (p.get("hint") or "") in hit, hit
