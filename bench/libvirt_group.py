"""libvirt domains: blktx's pause window and wall time against the same calls by hand.

For N = 1, 4 and 8 running TCG domains with two qcow2 disks each, in one run, under
two drivers: the embedded QEMU driver (``qemu:///embed?root=DIR``, in this process)
and a private ``libvirtd`` (``qemu+unix://``, in a mount namespace of its own, as the
tests start it), each method in turn:

- **blktx**: one transaction of ``libvirt.snapshot`` actions with
  ``quiesce = "pause"`` (journal, locks and watchdog on), run in this process
  (``Executor.run``); its pause window per domain and its wall time.
- **by hand** with libvirt-python: suspend every domain (one thread each),
  snapshot each (``DISK_ONLY|ATOMIC``), resume every domain; the window per domain
  and the wall time. Both windows are measured alike: per domain, from just before
  its ``suspend`` call to the return of its ``resume``, in the thread that makes them;
  the table shows the longest of the group.
- **loop**: the same snapshot calls one domain after another in this process, no
  pause (no common point in time): the floor of any loop.
- **virsh loop** (daemon only; virsh cannot reach another process's embedded driver):
  what issue 14 names, a shell loop of ``virsh snapshot-create-as --disk-only
  --atomic`` per domain (``sh -c``), against **blktx run**, the command a user runs
  (``python -m blktx run spec.toml``, a process of its own, as the loop's virsh).

Each snapshot is deleted (merged back) between runs, outside the clock; the methods
run interleaved, their order rotated each repeat. blktx is byte-compiled first, as an
install compiles it: a stale ``.pyc`` would be compiled again at every start (never
written back under ``PYTHONDONTWRITEBYTECODE``). Under the daemon, the floors of a
command are timed too: ``python -c pass``, the imports of ``blktx run`` with
libvirt-python (``python -c "import blktx.cli, libvirt"``), ``virsh -c URI version``.

    python bench/libvirt_group.py
    python bench/libvirt_group.py --domains 1 4 --repeat 5 --driver embed --json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

FLAGS = 16 | 128  # VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | ATOMIC


def clean(doms: list[Any]) -> None:
    for dom in doms:
        for snap in dom.listAllSnapshots(0):
            snap.delete(0)


def by_hand(doms: list[Any], name: str, together: bool) -> tuple[list[float], float]:
    """(each domain's window, wall time): suspend all, snapshot each, resume all; or,
    not together, one domain after another with no pause (the loop)."""
    xml = f"<domainsnapshot><name>{name}</name></domainsnapshot>"
    t0 = time.perf_counter()
    if not together:
        for dom in doms:
            dom.snapshotCreateXML(xml, FLAGS)
        return [], time.perf_counter() - t0
    with ThreadPoolExecutor(len(doms)) as pool:
        starts = list(pool.map(lambda d: (time.monotonic(), d.suspend())[0], doms))
        list(pool.map(lambda d: d.snapshotCreateXML(xml, FLAGS), doms))
        ends = list(pool.map(lambda d: (d.resume(), time.monotonic())[1], doms))
    return [e - s for s, e in zip(starts, ends, strict=True)], time.perf_counter() - t0


def with_blktx(base: Path, uri: str, doms: list[Any], name: str) -> tuple[list[float], float]:
    from blktx import ActionSpec, Executor, Transaction
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker

    spec = Transaction(
        [ActionSpec("libvirt.snapshot", {"uri": uri, "domain": d.name(), "name": name}) for d in doms],
        options={"quiesce": "pause"},
        base_dir=str(base),
    )
    t0 = time.perf_counter()
    journal = SqliteJournal(str(base / "journal.sqlite"))
    result = Executor(journal=journal, locker=Locker(str(base / "locks"))).run(spec, roots=[str(base)])
    wall = time.perf_counter() - t0
    if result.outcome != "committed":
        raise SystemExit(result.summary() + "\n" + "\n".join(str(p) for p in result.problems[:3]))
    return [h.window or 0.0 for h in result.holds], wall


def blktx_command(base: Path, uri: str, doms: list[Any], name: str) -> float:
    """Wall time of ``blktx run spec.toml`` (a process of its own) for the group."""
    text = 'version = 1\n[options]\nquiesce = "pause"\n'
    for d in doms:
        text += f'[[action]]\ntype = "libvirt.snapshot"\nuri = {json.dumps(uri)}\ndomain = "{d.name()}"\nname = "{name}"\n'
    spec = base / f"{name}.toml"
    spec.write_text(text)
    env = {**os.environ, "BLKTX_LOCK_DIR": str(base / "locks")}
    argv = [sys.executable, "-m", "blktx", "run", str(spec), "--journal", str(base / "journal.sqlite")]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"blktx run: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return wall


def virsh_loop(uri: str, doms: list[Any], name: str) -> float:
    """Wall time of a shell loop of ``virsh snapshot-create-as --disk-only --atomic``."""
    script = " && ".join(
        f"virsh -q -c {shlex.quote(uri)} snapshot-create-as {shlex.quote(d.name())} {name} --disk-only --atomic >/dev/null"
        for d in doms
    )
    t0 = time.perf_counter()
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"virsh loop: exit {done.returncode}\n{done.stderr}")
    return wall


def floors(uri: str, repeat: int) -> dict[str, float]:
    """Median wall times of what any command of each kind pays before its work."""
    argvs = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import blktx.cli, libvirt'": [sys.executable, "-c", "import blktx.cli, libvirt"],
        "virsh -c URI version": ["virsh", "-q", "-c", uri, "version"],
    }
    out = {}
    for what, argv in argvs.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        out[what] = statistics.median(times)
    return out


def compile_blktx() -> None:
    """Byte-code for every module of blktx, as an install writes it."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in ("blktx", "blktx_plugins"):
        compileall.compile_dir(str(root / package), quiet=1)


def measure(driver: str, uri: str, conn: Any, base: Path, n: int, repeat: int) -> dict[str, Any]:
    from libvirt_helpers import define

    doms = [define(conn, base, f"b{n}-{i}") for i in range(n)]
    got: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        got.setdefault(key, []).append(value)

    def blktx(r: int) -> None:
        w, t = with_blktx(base, uri, doms, f"x{r}")
        note("blktx_window", max(w))
        note("blktx_wall", t)

    def hand(r: int) -> None:
        w, t = by_hand(doms, f"h{r}", together=True)
        note("hand_window", max(w))
        note("hand_wall", t)

    methods: dict[str, Callable[[int], None]] = {
        "blktx": blktx,
        "hand": hand,
        "loop": lambda r: note("loop_wall", by_hand(doms, f"l{r}", together=False)[1]),
    }
    if driver == "daemon":
        methods["blktx run"] = lambda r: note("blktx_run_wall", blktx_command(base, uri, doms, f"c{r}"))
        methods["virsh"] = lambda r: note("virsh_wall", virsh_loop(uri, doms, f"v{r}"))
    order = list(methods)
    try:
        for r in range(repeat):
            # interleaved, the order rotated each repeat: no method always runs first
            k = r % len(order)
            for kind in order[k:] + order[:k]:
                methods[kind](r)
                clean(doms)
    finally:
        for dom in doms:
            dom.destroy()
            dom.undefine()
    row: dict[str, Any] = {"driver": driver, "domains": n, **{k: statistics.median(v) for k, v in got.items()}}
    row["samples"] = got
    row["window_ratio"] = row["blktx_window"] / row["hand_window"]
    row["wall_ratio_vs_loop"] = row["blktx_wall"] / row["loop_wall"]
    if "virsh_wall" in row:
        row["run_ratio_vs_virsh"] = row["blktx_run_wall"] / row["virsh_wall"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--driver", nargs="+", choices=["embed", "daemon"], default=["embed", "daemon"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from libvirt_helpers import QEMU_CONF, Daemon, libvirt_missing

    from blktx_plugins.libvirt import open_connection

    why = libvirt_missing()
    if why:
        raise SystemExit(why)
    compile_blktx()
    rows = []
    floor: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="blktx-bench-libvirt-") as tmp:
        for driver in args.driver:
            daemon = None
            if driver == "embed":
                root = Path(tmp) / "embed"
                (root / "etc").mkdir(parents=True)
                (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
                uri = f"qemu:///embed?root={root}"
            else:
                (Path(tmp) / "daemon").mkdir()
                daemon = Daemon(Path(tmp) / "daemon")
                uri = daemon.uri
            conn = open_connection(uri)
            try:
                if daemon is not None:
                    floor = floors(uri, max(args.repeat, 5))
                for n in args.domains:
                    rows.append(measure(driver, uri, conn, Path(tempfile.mkdtemp(dir=tmp)), n, args.repeat))
            finally:
                conn.close()
                if daemon is not None:
                    daemon.stop()
    if args.json:
        print(json.dumps({"rows": rows, "floors": floor} if floor else rows, indent=2))
        return
    print(
        f"{'driver':>6} {'N':>3} {'blktx window':>13} {'by hand':>9} {'ratio':>6} {'blktx wall':>11} {'loop wall':>10} "
        f"{'ratio':>6} {'blktx run':>10} {'virsh loop':>11} {'ratio':>6}"
    )
    for r in rows:
        line = (
            f"{r['driver']:>6} {r['domains']:>3} {r['blktx_window'] * 1000:>11.1f}ms {r['hand_window'] * 1000:>7.1f}ms "
            f"{r['window_ratio']:>6.2f} {r['blktx_wall'] * 1000:>9.1f}ms {r['loop_wall'] * 1000:>8.1f}ms "
            f"{r['wall_ratio_vs_loop']:>6.2f}"
        )
        if "virsh_wall" in r:
            line += f" {r['blktx_run_wall'] * 1000:>8.1f}ms {r['virsh_wall'] * 1000:>9.1f}ms {r['run_ratio_vs_virsh']:>6.2f}"
        print(line)
    if floor:
        print("floors: " + ", ".join(f"{what} {t * 1000:.1f}ms" for what, t in floor.items()))


if __name__ == "__main__":
    main()
