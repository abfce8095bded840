"""What a path is and who could change it (blktx.identity), tried with a real
unprivileged user owning folders that root's specs point into."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_helpers import make_image, needs_qemu_img

from blktx.identity import untrusted_file, untrusted_folders

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need root (blktx's setting) and `nobody`")


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def blktx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blktx", *args], capture_output=True, text=True, check=False)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    uid, gid = nobody()

    def drop() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return subprocess.run(list(argv), capture_output=True, text=True, preexec_fn=drop, check=False)


def test_a_folder_owned_or_writable_by_another_user_is_untrusted(tmp_path: Path) -> None:
    uid, gid = nobody()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, uid, gid)
    assert "owned by uid" in (untrusted_folders(str(theirs / "img.qcow2")) or "")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    assert "writable by group and others" in (untrusted_folders(str(shared / "img.qcow2")) or "")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "mine").mkdir(mode=0o700)
    assert untrusted_folders(str(sticky / "mine" / "img.qcow2")) is None, "a private folder under /tmp is fine"
    assert untrusted_folders(str(sticky / "img.qcow2")) is not None, "but not the sticky folder itself"
    os.symlink(theirs, tmp_path / "link")
    assert untrusted_folders(str(tmp_path / "link" / "img.qcow2")) is not None, "judged where the link leads"


def test_a_file_of_another_user_or_writable_by_others_is_untrusted(tmp_path: Path) -> None:
    uid, gid = nobody()
    f = tmp_path / "j.sqlite"
    f.write_bytes(b"")
    os.chmod(f, 0o666)
    assert "writable by others" in (untrusted_file(str(f)) or "")
    os.chmod(f, 0o600)
    os.chown(f, uid, gid)
    assert "owned by uid" in (untrusted_file(str(f)) or "")
    os.symlink(f, tmp_path / "link")
    assert "symlink" in (untrusted_file(str(tmp_path / "link")) or "")


@needs_qemu_img
def test_root_refuses_images_in_a_folder_nobody_can_swap(tmp_path: Path) -> None:
    """`nobody` owns the image folder: between check and use it could replace the
    image or a folder with a symlink to root's files. Refused unless allowed."""
    uid, gid = nobody()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    make_image(theirs / "d.qcow2")
    os.chown(theirs, uid, gid)
    spec = tmp_path / "t.toml"
    spec.write_text('version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "theirs/d.qcow2"\nname = "n"\n')
    out = blktx("run", "--json", str(spec))
    assert out.returncode == 2, out.stdout + out.stderr
    (problem,) = json.loads(out.stdout)["problems"]
    assert "[rule trusted-folders]" in problem["message"] and "--allow-shared-folders" in problem["hint"]
    assert problem["file"] == str(spec) and problem["line"] == 4, "the line of the image key"
    allowed = blktx("check", "--allow-shared-folders", str(spec))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


@pytest.fixture
def passable() -> Iterator[Path]:
    """A root folder that `nobody` may pass through (pytest's own are 0700 all the way)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="blktx-attack-", dir="/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path)


def test_root_refuses_a_journal_another_user_can_write(passable: Path) -> None:
    uid, gid = nobody()
    tmp_path = passable
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, uid, gid)
    (tmp_path / "t.toml").write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
    # nobody prepares a journal (or its -wal neighbour) for root to write
    made = as_nobody("/bin/sh", "-c", f": > {shared / 'j.sqlite'}")
    assert made.returncode == 0, made.stderr
    out = blktx("run", "--journal", str(shared / "j.sqlite"), str(tmp_path / "t.toml"))
    assert out.returncode == 2 and "refusing the journal" in out.stderr and "Traceback" not in out.stderr
    assert (shared / "j.sqlite").stat().st_size == 0, "root wrote nothing into it"


def test_root_refuses_a_vm_socket_outside_the_roots_and_tcp_without_opt_in(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text(
        'version = 1\n[[action]]\ntype = "qmp.internal-create"\n'
        'vm = "/run/somebody-elses-vm.qmp"\ndrive = "drive0"\nname = "n"\n'
        '[[action]]\ntype = "qmp.internal-create"\nvm = "tcp:127.0.0.1:4444"\n'
        'drive = "drive0"\nname = "n"\n'
    )
    out = blktx("check", "--json", str(tmp_path / "t.toml"))
    assert out.returncode == 2
    rules = sorted(p["message"].split("[rule ")[1].split("]")[0] for p in json.loads(out.stdout)["problems"])
    assert rules == ["confined-paths", "tcp-opt-in"]
