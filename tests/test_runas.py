"""Whom a QEMU tool that opens files by name runs as (blktx_plugins._runas)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktx import Refused
from blktx_plugins._runas import NOBODY, NOGROUP, RunAs, least_privileged, writers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="files owned by other users need root (blktx's setting)")


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder only root can change, which others can reach (pytest's tree is 0700)."""
    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="blktx-runas-"))
    top.chmod(0o755)
    (top / "images").mkdir(mode=0o755)
    try:
        yield top / "images"
    finally:
        shutil.rmtree(top)


def files(folder: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        (folder / name).write_bytes(b"x")
        (folder / name).chmod(0o644)
        out.append(str(folder / name))
    return out


def test_root_owned_files_in_root_owned_folders_run_as_root(folder: Path) -> None:
    a, b = files(folder, "a", "b")
    assert least_privileged([a, b]) is None
    assert writers([a]).users == {} and writers([a]).anyone is None


def test_the_one_owner_of_an_image_is_whom_the_tool_runs_as(folder: Path) -> None:
    a, b = files(folder, "a", "b")
    os.chown(a, 1234, 4321)
    who = least_privileged([a, b])
    assert who is not None and (who.uid, who.gid) == (1234, NOGROUP) and a in who.why


def test_a_group_writable_image_gives_its_group(folder: Path) -> None:
    (a,) = files(folder, "a")
    os.chmod(a, 0o664)
    os.chown(a, 0, 777)
    who = least_privileged([a])
    assert who is not None and (who.uid, who.gid) == (NOBODY, 777)


def test_a_folder_someone_else_can_change_counts_as_its_files(folder: Path) -> None:
    (a,) = files(folder, "a")
    os.chown(folder, 1234, 0)
    who = least_privileged([a])
    assert who is not None and who.uid == 1234 and str(folder) in who.why
    os.chown(folder, 0, 0)
    os.chmod(folder, 0o777)
    assert writers([a]).anyone and least_privileged([a]) == RunAs(NOBODY, NOGROUP, f"{folder} is writable by anyone")
    os.chmod(folder, 0o1777)  # sticky: others cannot rename what they do not own
    assert least_privileged([a]) is None


def test_two_users_who_can_change_the_chain_are_refused(folder: Path) -> None:
    a, b = files(folder, "a", "b")
    os.chown(a, 1234, 0)
    os.chown(b, 5678, 0)
    with pytest.raises(Refused, match="more than one user or group"):
        least_privileged([a, b])


def test_refusal_names_what_the_identity_cannot_read_write_or_reach(folder: Path) -> None:
    a, b = files(folder, "a", "b")
    os.chown(a, 1234, 0)
    os.chmod(a, 0o600)
    who = RunAs(1234, NOGROUP, "test")
    assert who.refusal([b], [a]) is None
    os.chmod(b, 0o600)
    assert who.refusal([b], [a]) == f"uid 1234, gid {NOGROUP} (test) cannot read {b}"
    os.chmod(b, 0o644)
    os.chmod(folder, 0o700)
    assert "no search permission on" in (who.refusal([b], []) or "")
    os.chmod(folder, 0o755)
    os.chmod(a, 0o400)
    assert who.refusal([], [a]) == f"uid 1234, gid {NOGROUP} (test) cannot read and write {a}"
