"""docs/tutorial.md, followed for real: every command it shows is run, in order.

The tutorial is written for an operator of a VM host; this test follows it on
real qcow2 images in a temporary folder:

- ``<!-- run -->`` before a ```` ```sh ```` block: its lines starting with ``$ `` are
  commands (a line ending in ``\\`` goes on with the next), the lines after one,
  up to the next ``$ ``, are its output as the tutorial shows it. The commands
  run in order in one bash (``set -e`` off, so ``cd`` and ``export`` carry on to
  the next block). A command ending in ``# exit N`` must exit with N, every
  other one with 0. An output line ending in ``  # ✓`` must appear in that
  command's output, in the order shown; snapshot names, transaction ids, dates,
  times, ages, durations and pids are masked (any value of their form), and
  wrapped lines and column padding do not matter.
- A snapshot name (``nightly-YYYYMMDD-HHMMSS``) or a transaction id first seen
  on a ✓ line is bound to the value this run printed there: later commands and
  ✓ lines use this run's value (so ``blktx revert web@<the name listed>``
  reverts to what this run made, and a later ✓ line must show that very one).
- ``<!-- file: PATH -->`` before a block: the block is written to PATH when the
  commands reach it (the spec of step 2).
- ``<!-- same-as: PATH -->`` before a block: the block is PATH of this
  repository, verbatim (the systemd units of step 3).

The tutorial's folders (``/srv/vm``, ``/etc/blktx``, ``/var/lib/blktx``) are
replaced by folders of the test's temporary one, in commands, files and
expected lines; ``BLKTX_JOURNAL`` and ``BLKTX_LOCK_DIR`` point there too, so
nothing of the machine's own is touched. ``blktx`` is this interpreter's
(``python -m blktx``). systemd is not available where the tests run (no
systemd as PID 1 in a container), so the tutorial's ``systemctl`` and
``journalctl`` blocks are not marked ``run``: they are not run here, but the
unit files they install are checked to be contrib/systemd's, the drop-in's
``ExecStart`` to be a command blktx accepts, and the commands the service runs
are run by hand in step 3.

``python tests/test_tutorial.py --record`` follows the tutorial the same way
(in folders of the same length as the tutorial's, so tables keep their widths)
and writes each command's real output and exit status back into
docs/tutorial.md, keeping ``# ✓`` on the lines that still match, and replacing
the names and transaction ids everywhere by the new run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
#: The tutorial's folders, replaced by temporary ones when it is followed.
FOLDERS = ("/var/lib/blktx", "/etc/blktx", "/srv/vm")
MARK = "  # ✓"
_ANNOTATION = re.compile(r"^<!-- (run|file|same-as)(?:: (\S+))? -->$")
_EXIT = re.compile(r"\s+# exit (\d+)$")
#: Values that differ from run to run, masked in expected lines; the first two are bound.
_TOKENS = re.compile(
    r"(?P<name>nightly-\d{8}-\d{6})"
    r"|(?P<txid>\d{8}T\d{6}-[0-9a-f]{8})"
    r"|(?P<week>\d{4}-W\d{2})"
    r"|(?P<date>\d{4}-\d{2}-\d{2})"
    r"|(?P<time>\d+:\d{2}(?::\d{2})?(?:\.\d+)?)"
    r"|(?P<age>\b\d+(?:\.\d+)? ?(?:ms|s|m|h|d)\b)"
    r"|(?P<float>\b\d+\.\d+\b)"
    r"|(?<=pid )(?P<pid>\d+)"
)
_MASKS = {
    "name": r"nightly-\d{8}-\d{6}",
    "txid": r"\d{8}T\d{6}-[0-9a-f]{8}",
    "week": r"\d{4}-W\d{2}",
    "date": r"\d{4}-\d{2}-\d{2}",
    "time": r"\d+:\d{2}(?::\d{2})?(?:\.\d+)?",
    "age": r"\d+(?:\.\d+)? ?(?:ms|s|m|h|d)",
    "float": r"\d+\.\d+",
    "pid": r"\d+",
}
_BOUND = ("name", "txid")
#: What a non-interactive bash says of a killed command; an interactive one says "Killed".
_KILLED = re.compile(r"^bash: line \d+: +\d+ Killed\b.*$")


# -- the tutorial, read ----------------------------------------------------------------


@dataclass
class Command:
    line: int  # 1-based, in the tutorial
    text: str  # continuation lines joined with "\n"
    status: int
    output: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[str]:
        return [o[: -len(MARK)].rstrip() for o in self.output if o.endswith(MARK)]


@dataclass
class Block:
    kind: str  # run, file or same-as
    arg: str
    start: int  # 0-based index of its first line of content
    end: int  # 0-based index of its closing fence
    text: str
    commands: list[Command] = field(default_factory=list)


def read_blocks(text: str | None = None) -> list[Block]:
    lines = (TUTORIAL.read_text() if text is None else text).splitlines()
    found = []
    for n, line in enumerate(lines):
        mark = _ANNOTATION.match(line)
        if mark is None:
            continue
        assert lines[n + 1].startswith("```"), f"tutorial.md:{n + 1}: {line} is not followed by a code block"
        end = next(i for i in range(n + 2, len(lines)) if lines[i] == "```")
        block = Block(mark.group(1), mark.group(2) or "", n + 2, end, "".join(f"{x}\n" for x in lines[n + 2 : end]))
        if block.kind == "run":
            assert lines[n + 1] == "```sh", f"tutorial.md:{n + 2}: a run block is a ```sh block"
            block.commands = _commands(lines, n + 2, end)
        found.append(block)
    return found


def _commands(lines: list[str], start: int, end: int) -> list[Command]:
    commands: list[Command] = []
    i = start
    while i < end:
        line = lines[i]
        if line.startswith("$ "):
            first, text = i, line[2:]
            while text.endswith("\\") and i + 1 < end:
                i += 1
                text += "\n" + lines[i]
            status = _EXIT.search(text)
            commands.append(Command(first + 1, text, int(status.group(1)) if status else 0))
        else:
            assert commands, f"tutorial.md:{i + 1}: output before any command in a run block"
            commands[-1].output.append(line)
        i += 1
    assert commands, f"tutorial.md:{start}: a run block without a command"
    return commands


# -- expected lines, matched --------------------------------------------------------


def _pattern(line: str, bound: dict[str, str]) -> tuple[re.Pattern[str], dict[str, str]]:
    """A regex for one expected line (whitespace collapsed, values masked) and which
    of its groups binds which tutorial value."""
    line = " ".join(line.split())
    parts, groups, seen, at = [], {}, {}, 0
    for m in _TOKENS.finditer(line):
        parts.append(re.escape(line[at : m.start()]))
        kind, value = next((k, v) for k, v in m.groupdict().items() if v is not None)
        if kind in _BOUND and value in bound:
            parts.append(re.escape(bound[value]))
        elif kind in _BOUND and value in seen:
            parts.append(f"(?P={seen[value]})")
        elif kind in _BOUND:
            seen[value] = f"g{len(seen)}"
            groups[seen[value]] = value
            parts.append(f"(?P<{seen[value]}>{_MASKS[kind]})")
        else:
            parts.append(_MASKS[kind])
        at = m.end()
    parts.append(re.escape(line[at:]))
    return re.compile("".join(parts)), groups


def match(checks: list[str], output: str, bound: dict[str, str]) -> tuple[list[int], str | None]:
    """Find each expected line in ``output``, in order, binding new values into
    ``bound``. Returns the output line where each was found, and the first expected
    line not found (or None)."""
    lines = [" ".join(x.split()) for x in output.splitlines()]
    starts, flat = [], ""
    for x in lines:
        starts.append(len(flat))
        flat += x + " "
    found, at = [], 0
    for check in checks:
        pattern, groups = _pattern(check, bound)
        m = pattern.search(flat, at)
        if m is None:
            return found, check
        for group, value in groups.items():
            assert m.group(group) not in bound.values(), f"{value} and another tutorial value both stand for {m.group(group)}"
            bound[value] = m.group(group)
        found.append(max(i for i, s in enumerate(starts) if s <= m.start()))
        at = m.end()
    return found, None


def _substitute(text: str, folders: dict[str, str], bound: dict[str, str]) -> str:
    for old in sorted(folders, key=len, reverse=True):
        text = text.replace(old, folders[old])
    for old, new in bound.items():
        text = text.replace(old, new)
    return text


# -- the tutorial, followed -----------------------------------------------------------


class Shell:
    """One bash for all the commands; each command's output goes to a file of its own."""

    def __init__(self, cwd: Path, env: dict[str, str], outputs: Path) -> None:
        self.outputs = outputs
        self.count = 0
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def run(self, command: str, timeout: float = 180) -> tuple[int, str]:
        self.count += 1
        out = self.outputs / f"{self.count}.out"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f'{{ {command}\n}} >{shlex.quote(str(out))} 2>&1 </dev/null; echo "@@rc $?"\n'.encode())
        self.proc.stdin.flush()
        said, deadline = b"", time.monotonic() + timeout
        while (rc := re.search(rb"@@rc (\d+)\n", said)) is None:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.proc.stdout], [], [], left)[0], f"{command}: no end within {timeout} s"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"bash ended during {command}: {said.decode(errors='replace')}"
            said += chunk
        noise = said[: rc.start()].decode(errors="replace")
        return int(rc.group(1)), noise + out.read_text(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Ran:
    block: Block
    command: Command
    status: int
    output: str  # as printed, the tutorial's folders put back
    found: list[int]  # the output lines where the ✓ lines were found
    missing: str | None  # the first ✓ line not found


def follow(top: Path, folders: dict[str, str], columns: int, bound: dict[str, str]) -> Iterator[Ran]:
    """Run the tutorial's blocks in order; yield each command as it ran. ``bound``
    gets the tutorial's names and ids, each with this run's."""
    for real in folders.values():
        Path(real).parent.mkdir(parents=True, exist_ok=True)
    (top / "bin").mkdir()
    (top / "outputs").mkdir()
    wrapper = top / "bin" / "blktx"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m blktx "$@"\n')
    wrapper.chmod(0o755)
    var = folders["/var/lib/blktx"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLKTX_")}
    env |= {
        "BLKTX_JOURNAL": f"{var}/journal.sqlite",
        "BLKTX_LOCK_DIR": f"{var}/locks",
        "COLUMNS": str(columns),
        "PATH": f"{top / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    }
    back = {new: old for old, new in folders.items()}
    shell = Shell(top, env, top / "outputs")
    try:
        for block in read_blocks():
            if block.kind == "file":
                path = Path(_substitute(block.arg, folders, {}))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(_substitute(block.text, folders, bound))
                continue
            for command in block.commands:
                unbound = [
                    m.group(0) for m in _TOKENS.finditer(command.text) if m.lastgroup in _BOUND and m.group(0) not in bound
                ]
                text = _substitute(command.text, folders, bound)
                assert not unbound, f"tutorial.md:{command.line}: {unbound} shown by no ✓ line before: {command.text}"
                status, output = shell.run(text)
                checks = [_substitute(c, folders, {}) for c in command.checks]
                found, missing = match(checks, output, bound)
                yield Ran(block, command, status, _substitute(output, back, {}), found, missing)
    finally:
        shell.close()
        _stop_daemons(folders)


def _stop_daemons(folders: dict[str, str]) -> None:
    """The storage daemons the tutorial started (their pidfiles), if they still run."""
    for folder in folders.values():
        for pidfile in Path(folder).glob("*.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
                if b"qemu-storage-daemon" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue


# -- the tests ---------------------------------------------------------------------


def test_the_tutorial_has_what_the_test_follows() -> None:
    blocks = read_blocks()
    commands = [c for b in blocks if b.kind == "run" for c in b.commands]
    assert len(commands) >= 40 and sum(len(c.checks) for c in commands) >= 50
    assert [b.arg for b in blocks if b.kind == "file"] == ["/etc/blktx/web.toml", "/etc/blktx/web.env"]
    everything = " ".join(c.text for c in commands)
    for command in ("blktx check", "blktx run", "blktx list", "blktx prune", "blktx revert", "blktx delete", "blktx recover"):
        assert command in everything, f"the tutorial runs no {command}"
    assert "BLKTX_CRASH_AFTER=" in everything and "--keep-current" in everything and "--dry-run" in everything


def test_the_unit_files_shown_are_contrib_systemds() -> None:
    shown = [b for b in read_blocks() if b.kind == "same-as"]
    assert {b.arg for b in shown} >= {"contrib/systemd/blktx@.service", "contrib/systemd/blktx@.timer"}
    for block in shown:
        assert block.text == (ROOT / block.arg).read_text(), f"the tutorial's {block.arg} differs from the repository's"


def test_every_blktx_command_the_tutorials_units_run_parses() -> None:
    from blktx.cli import build_parser

    text = TUTORIAL.read_text()
    lines = re.findall(r"^Exec\w*=(/\S*blktx\b.*)$", text, flags=re.M)
    env = re.search(r"^BLKTX_RUN_ARGS=(.*)$", text, flags=re.M)
    assert env is not None and "--root /srv/vm" in env.group(1), "web.env gives the service --root"
    assert any("$BLKTX_RUN_ARGS" in line for line in lines), "the service passes it to blktx run"
    for line in lines:
        argv = shlex.split(line.replace("$BLKTX_RUN_ARGS", env.group(1)).replace("%i", "web"))
        build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown option


def test_the_tutorial_followed(tmp_path: Path) -> None:
    """Every command of every ``<!-- run -->`` block, its exit status and its ✓ lines
    (systemctl is not run: see the module's docstring)."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (scripts/install installs qemu-utils): the tutorial snapshots qcow2 images")
    folders = {old: str(tmp_path / old.lstrip("/")) for old in FOLDERS}
    with contextlib.closing(follow(tmp_path, folders, columns=300, bound={})) as followed:  # a failure stops bash and daemons now
        for ran in followed:
            where = f"tutorial.md:{ran.command.line}: $ {ran.command.text}"
            assert ran.status == ran.command.status, f"{where}\nexit {ran.status}, not {ran.command.status}:\n{ran.output}"
            assert ran.missing is None, f"{where}\nthe line\n    {ran.missing}\nis not in its output:\n{ran.output}"


# -- --record: the outputs, rewritten from a real run -------------------------------


def record(columns: int = 300) -> int:
    """Follow the tutorial and write the real outputs into it (see the docstring)."""
    tag = next(t for t in (f"{a}{b}" for a in "BCDFGHJK" for b in "lmnpqrstv") if not Path(f"/tmp/{t}").exists())
    folders = {old: ("/tmp/" + (tag + "-" + re.sub("[^a-z]", "", old) * 3)[: len(old) - 5]) for old in FOLDERS}
    assert all(len(new) == len(old) and not Path(new).exists() for old, new in folders.items()), folders
    lines = TUTORIAL.read_text().splitlines()
    rewritten: dict[int, list[str]] = {}  # block start -> its new lines
    problems = 0
    top = Path(tempfile.mkdtemp(prefix="blktx-tutorial-"))
    bound_all: dict[str, str] = {}
    try:
        for old in folders.values():
            Path(old).mkdir(mode=0o700)
        with contextlib.closing(follow(top, folders, columns, bound_all)) as followed:
            for ran in followed:
                if ran.missing is not None or ran.status != ran.command.status:
                    problems += 1
                    print(f"tutorial.md:{ran.command.line}: exit {ran.status}; not found: {ran.missing}", file=sys.stderr)
                out = [_KILLED.sub("Killed", x.rstrip()) for x in ran.output.rstrip("\n").splitlines()]
                out = [x + MARK if i in ran.found else x for i, x in enumerate(out)]
                text = _EXIT.sub("", ran.command.text) + (f"  # exit {ran.status}" if ran.status else "")
                rewritten.setdefault(ran.block.start, []).extend(["$ " + text, *out])
    finally:
        for new in folders.values():
            shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)
    for block in sorted(read_blocks(), key=lambda b: -b.start):
        if block.kind == "run":
            lines[block.start : block.end] = rewritten[block.start]
    text = "\n".join(lines) + "\n"
    for old, new in bound_all.items():
        text = text.replace(old, new)
    TUTORIAL.write_text(text)
    print(f"{TUTORIAL}: rewritten; {problems} command(s) differed from what it showed", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_tutorial.py --record")
    sys.exit(record())
