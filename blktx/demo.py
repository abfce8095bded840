"""``blktx demo``: a group snapshot of real qcow2 images that commits, then one that
fails in its last action and rolls back, shown with ``qemu-img`` listings."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any

from blktx.executor import Executor
from blktx.plugins import Registry
from blktx.report import Console, print_result
from blktx.result import Result
from blktx.spec import load_spec

MARKER = ".blktx-demo"
IMAGES = ["vm1-disk0.qcow2", "vm1-disk1.qcow2", "vm2-disk0.base.qcow2"]

COMMIT_SPEC = """\
# A nightly group snapshot: internal snapshots of both disks of vm1, an external
# snapshot of vm2's disk (a new overlay becomes the active image behind the
# vm2-disk0 symlink), and last week's snapshot deleted after the commit point.
version = 1
description = "nightly group snapshot"

[[action]]
type = "qcow2.internal-create"
image = "vm1-disk0.qcow2"
name = "nightly"

[[action]]
type = "qcow2.internal-create"
image = "vm1-disk1.qcow2"
name = "nightly"

[[action]]
type = "qcow2.external-create"
device = "vm2-disk0"
overlay = "vm2-disk0.nightly.qcow2"

[[action]]
type = "qcow2.internal-delete"
image = "vm1-disk0.qcow2"
name = "weekly"
"""

ROLLBACK_SPEC = """\
# The same kind of group, but its last action fails after every other action has
# taken effect: all of them are cancelled, newest first, and nothing changes.
version = 1
description = "a drill that rolls back"

[[action]]
type = "qcow2.internal-create"
image = "vm1-disk0.qcow2"
name = "hourly"

[[action]]
type = "qcow2.internal-create"
image = "vm1-disk1.qcow2"
name = "hourly"

[[action]]
type = "qcow2.external-create"
device = "vm2-disk0"
overlay = "vm2-disk0.hourly.qcow2"

[[action]]
type = "fault"
phase = "invalidate"
message = "drill: the storage array refused the last snapshot"
"""


class DemoError(Exception):
    pass


def _run(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise DemoError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out.stdout


def prepare(directory: str) -> None:
    """Make the demo's images in ``directory``: only a new or earlier demo directory."""
    if shutil.which("qemu-img") is None:
        raise DemoError("qemu-img is not installed: run scripts/install (Debian package qemu-utils)")
    if os.path.exists(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, MARKER)):
        raise DemoError(f"{directory} exists and is not a blktx demo directory; give another with --dir")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, MARKER), "w").close()
    for i, name in enumerate(IMAGES):
        path = os.path.join(directory, name)
        _run("qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
        _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{0x41 + i:x} 0 4M", path)
    _run("qemu-img", "snapshot", "-c", "weekly", os.path.join(directory, IMAGES[0]))
    os.symlink(IMAGES[2], os.path.join(directory, "vm2-disk0"))
    for name, text in (("commit.toml", COMMIT_SPEC), ("rollback.toml", ROLLBACK_SPEC)):
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(text)


def state(directory: str) -> dict[str, Any]:
    """What the images look like, by qemu-img: snapshots, the active chain, data checksums."""
    snaps = {}
    for name in IMAGES[:2]:
        out = _run("qemu-img", "snapshot", "-l", os.path.join(directory, name))
        snaps[name] = [line.split()[1] for line in out.splitlines()[2:] if line.strip()]
    chain = _run("qemu-img", "info", "--backing-chain", "-U", os.path.join(directory, "vm2-disk0"))
    files = sorted(f for f in os.listdir(directory) if f.endswith(".qcow2"))
    data = {}
    for name in (IMAGES[0], IMAGES[1], "vm2-disk0"):
        data[name] = guest_digest(os.path.join(directory, name))
    return {
        "data": data,
        "snapshots": snaps,
        "vm2-disk0": os.readlink(os.path.join(directory, "vm2-disk0")),
        "vm2-chain": [line.split(": ", 1)[1] for line in chain.splitlines() if line.startswith("image: ")],
        "files": files,
    }


def guest_digest(image: str) -> str:
    """A digest of the guest-visible data of ``image`` (its whole chain), via qemu-img."""
    with tempfile.TemporaryDirectory(prefix="blktx-demo-") as tmp:
        raw = os.path.join(tmp, "raw")
        _run("qemu-img", "convert", "-U", "-O", "raw", image, raw)
        digest = hashlib.sha256()
        with open(raw, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def show(out: Console, title: str, st: dict[str, Any]) -> None:
    out.print(f"[bold]{title}[/bold]")
    for name, snaps in st["snapshots"].items():
        out.print(f"  qemu-img snapshot -l {name}: {', '.join(snaps) or '(none)'}")
    out.print(f"  vm2-disk0 -> {st['vm2-disk0']}; backing chain: {' <- '.join(reversed(st['vm2-chain']))}")
    out.print("  guest data sha256: " + ", ".join(f"{k} {v}" for k, v in st["data"].items()))


def run_demo(
    directory: str, registry: Registry, out: Console | None, journal: Any = None, locker: Any = None
) -> tuple[list[Result], dict[str, Any]]:
    directory = os.path.abspath(directory)
    prepare(directory)
    executor = Executor(registry, journal=journal, locker=locker)
    states = {"initial": state(directory)}
    if out:
        out.print(f"Demo images in {directory}\n")
        show(out, "Before", states["initial"])
    results = []
    for name, label in (
        ("commit.toml", "after the committed group snapshot"),
        ("rollback.toml", "after the drill that rolled back"),
    ):
        spec = os.path.join(directory, name)
        if out:
            out.print(f"\n[bold]$ blktx run {spec}[/bold]")
        result = executor.run(load_spec(spec))
        results.append(result)
        states[name] = state(directory)
        if out:
            print_result(result, out)
            show(out, label.capitalize(), states[name])
    unchanged = states["rollback.toml"] == states["commit.toml"]
    if out:
        verdict = "[green]unchanged[/green]" if unchanged else "[red]CHANGED[/red]"
        out.print(f"\nThe rollback left the images {verdict} (snapshot lists, symlink, backing chain, files, guest data).")
    return results, {"states": states, "rollback_left_world_unchanged": unchanged}
