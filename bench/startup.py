"""Start-up cost: CPU time (user + sys) of one short blktx command, as a timer runs it.

Each method is one whole process, its CPU time read from ``wait4``'s rusage:
``blktx check one.toml`` (one ``sim.noop`` action), the same with ``--json``,
``blktx check qcow2.toml`` (one ``qcow2.internal-create`` of a 1 MiB image), and
``blktx types --json``, each run as the console script does
(``python -c 'from blktx.cli import entry; entry()'``), against ``python -c pass``
(the floor of any Python command on this machine: interpreter and ``site``). The
byte code is compiled first (``compileall``), as an installed package has it. With
``--against REV`` the same commands run from a ``git worktree`` of REV too
(``PYTHONPATH`` put first), interleaved with this tree's, so that a change is
measured against what it changed. Methods are interleaved, the order rotated
every repeat; median [min-max] of ``--repeat`` runs (default 21).

    python bench/startup.py
    python bench/startup.py --against 8fad088 --repeat 31
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The issue 16 target: ``blktx check one.toml`` within this many ms of CPU.
TARGET_MS = 80.0
MAIN = "import sys; from blktx.cli import entry; sys.exit(entry())"
COMMANDS = {
    "check": ["check", "one.toml"],
    # A real one-image spec: its plugin (qcow2, with its image and daemon modules) is imported.
    "check qcow2": ["check", "qcow2.toml"],
    "check --json": ["check", "--json", "one.toml"],
    "types --json": ["types", "--json"],
}


def cpu_ms(argv: list[str], env: dict[str, str], cwd: str) -> float:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")
    return (usage.ru_utime + usage.ru_stime) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--against", metavar="REV", help="also measure this git revision (a worktree of it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blktx-startup-") as work:
        Path(work, "one.toml").write_text('version = 1\n[[action]]\ntype = "sim.noop"\nkey = "a"\n')
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(work, "a.qcow2"), "1M"], check=True)
        Path(work, "qcow2.toml").write_text(
            'version = 1\n[[action]]\ntype = "qcow2.internal-create"\nimage = "a.qcow2"\nname = "s"\n'
        )
        trees = {"this tree": str(ROOT)}
        if args.against:
            other = os.path.join(work, "against")
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", other, args.against], check=True)
            trees[args.against] = other
        try:
            for tree in trees.values():
                subprocess.run([sys.executable, "-m", "compileall", "-q", "blktx", "blktx_plugins"], cwd=tree, check=True)
            env = {k: v for k, v in os.environ.items() if k not in ("BLKTX_LOAD_PLUGINS", "COLUMNS")}
            methods: list[tuple[str, list[str], dict[str, str]]] = [("python -c pass", [sys.executable, "-c", "pass"], env)]
            for label, tree in trees.items():
                for name, cmd in COMMANDS.items():
                    methods.append((f"{name} ({label})", [sys.executable, "-c", MAIN, *cmd], {**env, "PYTHONPATH": tree}))
            seen: dict[str, list[float]] = {name: [] for name, _, _ in methods}
            for r in range(args.repeat):
                order = methods[r % len(methods) :] + methods[: r % len(methods)]
                for name, argv, menv in order:
                    seen[name].append(cpu_ms(argv, menv, work))
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", trees[args.against]], check=False)
    load = os.getloadavg()[0]
    print(f"CPU ms (user + sys), {args.repeat} runs each, interleaved; median [min-max]")
    for name, values in seen.items():
        print(f"  {name:34} {statistics.median(values):7.1f}  [{min(values):.1f}-{max(values):.1f}]")
    check = statistics.median(seen["check (this tree)"])
    floor = statistics.median(seen["python -c pass"])
    verdict = "met" if check <= TARGET_MS else "NOT met"
    above = check - floor
    print(f"blktx check one.toml: {check:.1f} ms CPU (target <= {TARGET_MS:g}: {verdict}); {above:.1f} ms above python -c pass")
    print(f"load average after: {load:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
