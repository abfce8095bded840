"""The real-component helpers live in blktx.testing (shipped for plugin authors);
the host-run guest agent is the tests' own."""

import shutil
from pathlib import Path
from typing import Any

import pytest

from blktx.testing.fixtures import (  # noqa: F401
    VM,
    chain,
    make_image,
    needs_qemu_img,
    needs_qemu_system,
    one_command,
    run,
    same_data,
    snapshots,
    subvolumes,
    world,
)


class GuestAgent:
    """A real ``qemu-ga`` run on this host, listening on a unix socket: the same
    protocol a VM's agent channel speaks, freezing this host's filesystems. Tests
    always name the mountpoints to freeze (a loop-mounted btrfs): a bare
    ``guest-fsfreeze-freeze`` would freeze every filesystem here."""

    def __init__(self, directory: Path, mounts: list[Path]) -> None:
        import subprocess
        import time

        self.sock = directory / "qga.sock"
        self.mounts = mounts
        state = directory / "qga-state"
        state.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-ga", "-m", "unix-listen", "-p", str(self.sock), "-t", str(state), "-l", str(directory / "qga.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return one_command(self.sock, name, args, agent=True)

    def status(self) -> str:
        return str(self.cmd("guest-fsfreeze-status"))

    def stop(self) -> None:
        import subprocess

        for mnt in self.mounts:  # never leave a filesystem of this host frozen
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, check=False)
        self.proc.terminate()
        self.proc.wait(timeout=10)


needs_qemu_ga = pytest.mark.skipif(shutil.which("qemu-ga") is None, reason="needs qemu-ga (Debian qemu-guest-agent)")
