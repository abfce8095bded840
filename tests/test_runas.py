"""Whom a QEMU tool that opens files by name runs as (blktx_plugins._runas)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktx import Refused
from blktx_plugins._runas import NOBODY, NOGROUP, RunAs, least_privileged, resolution, writers

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


def test_an_image_only_a_group_can_change_is_refused(folder: Path) -> None:
    """No one uid stands for a group's members: run as ``nobody`` the tool would read
    nobody's files for them."""
    (a,) = files(folder, "a")
    os.chmod(a, 0o664)
    os.chown(a, 0, 777)
    with pytest.raises(Refused, match=f"{a} is writable by gid 777: whoever changed the chain"):
        least_privileged([a])


def test_a_folder_someone_else_can_change_counts_as_its_files(folder: Path) -> None:
    (a,) = files(folder, "a")
    os.chown(folder, 1234, 0)
    who = least_privileged([a])
    assert who is not None and who.uid == 1234 and str(folder) in who.why
    os.chown(folder, 0, 0)
    os.chmod(folder, 0o777)
    assert writers([a]).anyone
    with pytest.raises(Refused, match=f"{folder} is writable by anyone: whoever changed the chain"):
        least_privileged([a])
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


def _acl(path: str, *entries: tuple[int, int, int]) -> None:
    """Set ``path``'s access ACL: (tag, perm, id) entries (``setfacl`` without the tool)."""
    os.setxattr(path, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))


UNDEF = 0xFFFFFFFF


def test_a_user_an_acl_lets_write_an_image_counts_as_one_who_can_change_it(folder: Path) -> None:
    """A root-owned image with ``user:1234:rw-`` (its mode then shows the mask, 0660):
    1234 can change it, not some member of gid 0."""
    (a,) = files(folder, "a")
    _acl(a, (0x01, 6, UNDEF), (0x02, 6, 1234), (0x04, 0, UNDEF), (0x10, 6, UNDEF), (0x20, 0, UNDEF))
    assert os.stat(a).st_mode & 0o777 == 0o660
    found = writers([a])
    assert found.users == {1234: f"{a} is writable by uid 1234 (its ACL)"} and found.groups == {}
    who = least_privileged([a])
    assert who is not None and (who.uid, who.gid) == (1234, NOGROUP)
    assert who.allows(a, os.R_OK | os.W_OK)  # by the ACL: no refusal at check for that
    _acl(a, (0x01, 6, UNDEF), (0x02, 6, 1234), (0x04, 0, UNDEF), (0x10, 4, UNDEF), (0x20, 0, UNDEF))
    assert writers([a]).users == {} and not RunAs(1234, NOGROUP, "t").allows(a, os.W_OK)  # the mask takes write away


def test_a_group_an_acl_lets_write_a_folder_counts(folder: Path) -> None:
    (a,) = files(folder, "a")
    _acl(str(folder), (0x01, 7, UNDEF), (0x04, 5, UNDEF), (0x08, 7, 777), (0x10, 7, UNDEF), (0x20, 5, UNDEF))
    assert writers([a]).groups == {777: f"{folder} is writable by gid 777"}


def test_a_user_and_a_group_with_other_members_are_refused(folder: Path) -> None:
    """alice's image, writable by her group: the group's other members can change it too,
    and run as alice the tool would read her files for them."""
    (a,) = files(folder, "a")
    os.chown(a, 1234, 4242)
    os.chmod(a, 0o664)
    with pytest.raises(Refused, match="more than one user or group"):
        least_privileged([a])
    os.chown(a, NOBODY, NOGROUP)  # nogroup is also the primary group of other users (sshd, _apt...)
    if any(p.pw_gid == NOGROUP and p.pw_uid not in (0, NOBODY) for p in pwd.getpwall()):
        with pytest.raises(Refused, match="more than one user or group"):
            least_privileged([a])


def test_a_user_and_a_group_of_their_own_run_as_that_user() -> None:
    own = [
        p
        for p in pwd.getpwall()
        if p.pw_uid != 0
        and not set(grp.getgrgid(p.pw_gid).gr_mem) - {p.pw_name, "root"}
        and all(q.pw_uid in (0, p.pw_uid) for q in pwd.getpwall() if q.pw_gid == p.pw_gid)
    ]
    if not own:
        pytest.skip("no user with a group of their own here")
    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="blktx-runas-"))
    try:
        top.chmod(0o755)
        (a,) = files(top, "a")
        os.chown(a, own[0].pw_uid, own[0].pw_gid)
        os.chmod(a, 0o664)
        who = least_privileged([a])
        assert who is not None and (who.uid, who.gid) == (own[0].pw_uid, own[0].pw_gid)
    finally:
        shutil.rmtree(top)


def test_the_folders_of_the_symlinks_a_lookup_follows_count(folder: Path) -> None:
    """``a`` is root's in root's folder, but named through ``t/link``: the owner of ``t``
    can point the link elsewhere."""
    (a,) = files(folder, "a")
    (folder / "t").mkdir()
    os.chown(folder / "t", 1234, 0)
    os.symlink("../a", folder / "t" / "link")
    assert resolution(str(folder / "t" / "link")) == [str(folder / "t"), str(folder / "t" / "link"), a]
    assert least_privileged([a]) is None
    who = least_privileged([str(folder / "t" / "link")])
    assert who is not None and who.uid == 1234 and str(folder / "t") in who.why


def test_the_users_own_supplementary_groups_count_as_what_it_can_read(folder: Path) -> None:
    """Run as a user, the tool keeps the groups a login gives that user (it reads only
    what the user could): a file of one of them is readable, others' are not."""
    (a,) = files(folder, "a")
    os.chown(a, 0, 777)
    os.chmod(a, 0o640)
    assert RunAs(1234, NOGROUP, "t", groups=(777,)).allows(a, os.R_OK)
    assert not RunAs(1234, NOGROUP, "t", groups=(778,)).allows(a, os.R_OK)
    (b,) = files(folder, "b")
    os.chown(b, NOBODY, NOGROUP)
    who = least_privileged([b])
    entry = pwd.getpwuid(NOBODY)
    expected = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid}))
    assert who is not None and (who.uid, who.gid, who.groups) == (NOBODY, entry.pw_gid, expected)


def test_every_folder_a_name_passes_through_counts_and_a_missing_one_is_refused(folder: Path) -> None:
    """``sub/../a`` passes through ``sub``: its owner can make it a symlink elsewhere,
    so they count; ``gone/../a`` stops the kernel at ``gone``: refused."""
    from blktx_plugins._runas import resolution

    (a,) = files(folder, "a")
    (folder / "sub").mkdir()
    os.chown(folder / "sub", 1234, 0)
    via = f"{folder}/sub/../a"
    assert resolution(via) == [f"{folder}/sub", a]
    assert 1234 in writers([via]).users
    with pytest.raises(Refused, match=r"its folder .*gone does not exist"):
        resolution(f"{folder}/gone/../a")
