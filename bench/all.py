"""Every benchmark, one after another, as bench/README.md quotes them: one command.

Each bench runs as its own process with the arguments below (the ones the README's
targets are judged on), its output printed as it comes. With ``--write`` each output
replaces the block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in
bench/README.md, headed by the command, the commit, the date and the load average
before it, so that the README's latest numbers are what this command printed.

    python bench/all.py                      # every bench (~20 min on 2 cores)
    python bench/all.py --only startup overhead
    python bench/all.py --write              # and rewrite the README's blocks

A bench that cannot run here (no libvirt, no qemu-system) exits non-zero: its
block is left as it was and the command says so, and exits 1 at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
#: A line of libvirt's own log: ``2026-11-27 13:51:15.007+0000: 10276: info : ...``.
LIBVIRT_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d{4}: \d+: \w+ : ")
#: name -> the arguments its README block is measured with.
BENCHES: dict[str, list[str]] = {
    "startup": ["bench/startup.py", "--repeat", "21"],
    "overhead": ["bench/overhead.py"],
    "qcow2_group": ["bench/qcow2_group.py", "--methods", "blktx", "blktx-json", "shell-loop", "one-daemon", "split-daemons"],
    "external_group": ["bench/external_group.py", "--sizes", "500", "--repeat", "5"],
    "revert": ["bench/revert.py"],
    "qmp_pause": ["bench/qmp_pause.py"],
    "libvirt_group": ["bench/libvirt_group.py", "--domains", "1", "4", "8", "--repeat", "7"],
}


def run(name: str) -> tuple[int, str]:
    """Run one bench from the repository's top, echoing its output; its status and
    the block for the README."""
    argv = BENCHES[name]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE.parent, capture_output=True)
    head = f"{commit.stdout.strip() or '?'}{'+changes' if dirty.stdout.strip() else ''}"
    load = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"== {name}: python {' '.join(argv)}", flush=True)
    # Both streams (some benches print their progress and table on stderr); libvirt's
    # own log lines (the embedded driver's start-up, taint warnings) stay out of the block.
    proc = subprocess.Popen([sys.executable, *argv], cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        if not LIBVIRT_LOG.match(line):
            lines.append(line)
    status = proc.wait()
    block = f"```\n$ python {' '.join(argv)}    # {head}, {when}, load average before {load:.2f}\n{''.join(lines)}```\n"
    return status, block


def write(blocks: dict[str, str]) -> list[str]:
    """Replace each named block in the README; the names that have no block there."""
    text = README.read_text()
    missing = []
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            missing.append(name)
            continue
        text = pattern.sub(lambda m, b=block: m.group(1) + b + m.group(2), text)  # type: ignore[misc]
    README.write_text(text)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="these benches only")
    parser.add_argument("--write", action="store_true", help="rewrite bench/README.md's blocks with the outputs")
    args = parser.parse_args()
    blocks: dict[str, str] = {}
    failed = []
    for name in args.only or list(BENCHES):
        status, block = run(name)
        if status == 0:
            blocks[name] = block
        else:
            failed.append(name)
            print(f"== {name} exited {status}: its README block is left as it was", flush=True)
    if args.write:
        missing = write(blocks)
        for name in missing:
            print(f"== bench/README.md has no <!-- bench:{name} --> block: add one to keep {name}'s output", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
