"""libvirt domains: blktx's pause window and wall time against the same calls by hand.

For N = 1, 4 and 8 running TCG domains with two qcow2 disks each, under the
embedded QEMU driver (``qemu:///embed?root=DIR``, in this process), in one run:

- **blktx**: one transaction of ``libvirt.snapshot`` actions with
  ``quiesce = "pause"`` (journal and locks on); its pause window per domain and
  its wall time.
- **by hand** with libvirt-python: suspend every domain (one thread each),
  snapshot each (``DISK_ONLY|ATOMIC``), resume every domain; the window per
  domain (its suspend to its resume) and the wall time.
- **virsh loop**: ``virsh snapshot-create-as --disk-only --atomic`` per domain, one
  after another (no common point in time); its wall time. Needs a daemon: with the
  embedded driver it runs the same calls one domain after another in-process,
  which is the loop's floor.

Each snapshot is deleted (merged back) between runs, outside the clock; the methods
run interleaved, their order rotated each repeat.

    python bench/libvirt_group.py
    python bench/libvirt_group.py --domains 1 4 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
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
    not together, one domain after another with no pause (the virsh loop)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from libvirt_helpers import QEMU_CONF, define, libvirt_missing

    from blktx_plugins.libvirt import open_connection

    why = libvirt_missing()
    if why:
        raise SystemExit(why)
    rows = []
    with tempfile.TemporaryDirectory(prefix="blktx-bench-libvirt-") as tmp:
        root = Path(tmp) / "embed"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        uri = f"qemu:///embed?root={root}"
        conn = open_connection(uri)
        for n in args.domains:
            base = Path(tempfile.mkdtemp(dir=tmp))
            doms = [define(conn, base, f"b{n}-{i}") for i in range(n)]
            got: dict[str, list[float]] = {
                "blktx_window": [],
                "hand_window": [],
                "blktx_wall": [],
                "hand_wall": [],
                "loop_wall": [],
            }

            order = ["blktx", "hand", "loop"]
            for r in range(args.repeat):
                # interleaved, the order rotated each repeat: no method always runs first
                for kind in order[r % 3 :] + order[: r % 3]:
                    if kind == "blktx":
                        w, t = with_blktx(base, uri, doms, f"x{r}")
                        got["blktx_window"].append(max(w))
                        got["blktx_wall"].append(t)
                    elif kind == "hand":
                        w, t = by_hand(doms, f"h{r}", together=True)
                        got["hand_window"].append(max(w))
                        got["hand_wall"].append(t)
                    else:
                        got["loop_wall"].append(by_hand(doms, f"l{r}", together=False)[1])
                    clean(doms)
            for dom in doms:
                dom.destroy()
                dom.undefine()
            row = {"domains": n, **{k: statistics.median(v) for k, v in got.items()}}
            row["window_ratio"] = row["blktx_window"] / row["hand_window"]
            row["wall_ratio_vs_loop"] = row["blktx_wall"] / row["loop_wall"]
            rows.append(row)
        conn.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'N':>3} {'blktx window':>13} {'by hand':>9} {'ratio':>6} {'blktx wall':>11} {'loop wall':>10} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['domains']:>3} {r['blktx_window'] * 1000:>11.1f}ms {r['hand_window'] * 1000:>7.1f}ms "
            f"{r['window_ratio']:>6.2f} {r['blktx_wall'] * 1000:>9.1f}ms {r['loop_wall'] * 1000:>8.1f}ms "
            f"{r['wall_ratio_vs_loop']:>6.2f}"
        )


if __name__ == "__main__":
    main()
