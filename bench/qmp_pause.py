"""Pause windows of live VMs: blktx against a hand-sent stop / transaction / cont.

For 1, 4 and 16 VMs (``qemu-system-x86_64 -machine none``) with 4 qcow2 drives
each, blktx takes an internal snapshot of every drive with ``quiesce = "pause"``
(journal and locks on) and reports each VM's pause window (its ``stop`` to its
``cont``). In the same run, on the same VMs, the baseline sends ``stop``, one raw
QMP ``transaction`` for the VM's 4 drives, and ``cont`` by hand, one VM alone and
then all VMs at once from one event loop (the floor of a simultaneous group pause).

``--kind external`` does the same with external snapshots: the overlay files are
made and added as nodes before the clock starts on the hand-sent side (as blktx
makes them before the VMs stop), and the window holds the ``blockdev-snapshot``
switch.

    python bench/qmp_pause.py
    python bench/qmp_pause.py --kind external --repeat 3
    python bench/qmp_pause.py --vms 1 4 --json --dir /dev/shm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

DRIVES = 4


def start_vms(d: str, n: int) -> list[Any]:
    from pathlib import Path

    from qemu_helpers import VM

    return [VM(Path(d), f"vm{i}", drives=DRIVES) for i in range(n)]


KIND = "internal"


def prepare(vm: Any, name: str) -> list[dict[str, Any]]:
    """The raw QMP transaction for one VM's 4 drives. For external snapshots, the
    overlay files are made and added as nodes first, outside the timed window (as
    blktx does)."""
    if KIND == "internal":
        return [{"type": "blockdev-snapshot-internal-sync", "data": {"device": f"drive{i}", "name": name}} for i in range(DRIVES)]
    from blktx_plugins._qemu import Qmp, qemu_img

    conn = Qmp(str(vm.ctl))
    try:
        actions = []
        for dev in conn.cmd("query-block"):
            if not dev["device"].startswith("drive"):
                continue
            ins = dev["inserted"]
            overlay = f"{ins['file']}.{name}"
            qemu_img(
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                ins["file"],
                "-F",
                ins["drv"],
                "-u",
                overlay,
                str(ins["image"]["virtual-size"]),
            )
            node = f"{dev['device']}-{name}"
            conn.cmd(
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": overlay}, "backing": None},
            )
            actions.append({"type": "blockdev-snapshot", "data": {"node": ins["node-name"], "overlay": node}})
        return actions
    finally:
        conn.close()


def blktx_actions(vm: Any, name: str) -> list[Any]:
    from blktx import ActionSpec

    if KIND == "internal":
        return [
            ActionSpec("qmp.internal-create", {"vm": str(vm.sock), "drive": f"drive{i}", "name": name}) for i in range(DRIVES)
        ]
    return [
        ActionSpec("qmp.external-create", {"vm": str(vm.sock), "drive": f"drive{i}", "overlay": f"{vm.name}-d{i}.{name}.qcow2"})
        for i in range(DRIVES)
    ]


def hand_sent(vm: Any, name: str) -> float:
    from blktx_plugins._qemu import Qmp

    actions = prepare(vm, name)
    conn = Qmp(str(vm.ctl))
    try:
        t = time.perf_counter()
        conn.cmd("stop")
        conn.cmd("transaction", {"actions": actions})
        conn.cmd("cont")
        return time.perf_counter() - t
    finally:
        conn.close()


def hand_group(vms: list[Any], name: str) -> tuple[float, float]:
    """The same by hand for all VMs at once, as fast as ``qemu.qmp`` goes: one event
    loop connects to every VM, stops all, sends each its raw transaction, continues
    all. Returns (median window, total from the first connect to the last cont):
    the floor of a simultaneous group pause on this machine."""
    import asyncio

    from qemu.qmp import QMPClient

    prepared = [prepare(vm, name) for vm in vms]  # overlays made before the clock starts

    async def go() -> tuple[float, float]:
        t = time.perf_counter()
        clients = [QMPClient("hand") for _ in vms]
        await asyncio.gather(*(c.connect(str(vm.ctl)) for c, vm in zip(clients, vms, strict=True)))
        starts: dict[int, float] = {}
        ends: dict[int, float] = {}

        async def stop(i: int, c: Any) -> None:
            starts[i] = time.perf_counter()
            await c.execute("stop")

        async def cont(i: int, c: Any) -> None:
            await c.execute("cont")
            ends[i] = time.perf_counter()

        await asyncio.gather(*(stop(i, c) for i, c in enumerate(clients)))
        await asyncio.gather(
            *(c.execute("transaction", {"actions": actions}) for c, actions in zip(clients, prepared, strict=True))
        )
        await asyncio.gather(*(cont(i, c) for i, c in enumerate(clients)))
        total = time.perf_counter() - t
        await asyncio.gather(*(c.disconnect() for c in clients))
        return statistics.median(ends[i] - starts[i] for i in starts), total

    return asyncio.run(go())


def blktx_group(d: str, vms: list[Any], name: str) -> tuple[float, list[float]]:
    from blktx import Executor, Transaction
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker

    journal = SqliteJournal(os.path.join(d, "journal.sqlite"))
    tx = Transaction([a for vm in vms for a in blktx_actions(vm, name)], options={"quiesce": "pause"}, base_dir=d)
    t = time.perf_counter()
    result = Executor(journal=journal, locker=Locker(os.path.join(d, "locks"))).run(tx)
    total = time.perf_counter() - t
    assert result.outcome == "committed", result.summary()
    return total, [h.window for h in result.holds if h.window is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--kind",
        choices=["internal", "external"],
        default="internal",
        help="internal snapshots (the default) or external ones (overlay + switch)",
    )
    parser.add_argument(
        "--dir", default=None, help="where the images go (default: the system's temp dir); /dev/shm takes fsync out"
    )
    args = parser.parse_args()
    global KIND
    KIND = args.kind
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("needs qemu-system-x86_64 (Debian qemu-system-x86)")
    import blktx.plugins

    blktx.plugins.default_registry()
    rows = []
    for n in args.vms:
        d = tempfile.mkdtemp(prefix="blktx-qmp-bench-", dir=args.dir)
        vms = start_vms(d, n)
        try:
            totals, windows, hands, groups = [], [], [], []
            for r in range(args.repeat):
                total, w = blktx_group(d, vms, f"b{r}")
                totals.append(total)
                windows.extend(w)
                hands.extend(hand_sent(vm, f"h{r}") for vm in vms)
                groups.append(hand_group(vms, f"g{r}"))
            row = {
                "vms": n,
                "drives_per_vm": DRIVES,
                "kind": KIND,
                "blktx_total_s": statistics.median(totals),
                "blktx_window_median_s": statistics.median(windows),
                "blktx_window_max_s": max(windows),
                "hand_window_median_s": statistics.median(hands),
                "hand_group_window_median_s": statistics.median(g[0] for g in groups),
                "hand_group_total_s": statistics.median(g[1] for g in groups),
                "window_ratio": statistics.median(windows) / statistics.median(hands),
            }
            row["window_ratio_vs_hand_group"] = row["blktx_window_median_s"] / row["hand_group_window_median_s"]
            row["total_ratio_vs_hand_group"] = row["blktx_total_s"] / row["hand_group_total_s"]
            rows.append(row)
            print(
                f"{n:>2} VMs x {DRIVES} drives, {KIND}: blktx total {row['blktx_total_s'] * 1000:7.1f} ms, pause window "
                f"median {row['blktx_window_median_s'] * 1000:6.1f} ms (max {row['blktx_window_max_s'] * 1000:6.1f}); "
                f"hand-sent stop/transaction/cont {row['hand_window_median_s'] * 1000:6.1f} ms; "
                f"ratio {row['window_ratio']:.2f}x",
                file=sys.stderr,
            )
            print(
                f"{'':>19}by hand for all VMs at once: window {row['hand_group_window_median_s'] * 1000:6.1f} ms "
                f"(blktx/hand {row['window_ratio_vs_hand_group']:.2f}x), total {row['hand_group_total_s'] * 1000:6.1f} ms "
                f"(blktx/hand {row['total_ratio_vs_hand_group']:.2f}x)",
                file=sys.stderr,
            )
        finally:
            for vm in vms:
                vm.quit()
            subprocess.run(["rm", "-rf", d], check=False)
    report: dict[str, Any] = {"rows": rows}
    by = {r["vms"]: r for r in rows}
    if 1 in by and 16 in by:
        report["total_16_over_1"] = by[16]["blktx_total_s"] / by[1]["blktx_total_s"]
        report["hand_group_total_16_over_1"] = by[16]["hand_group_total_s"] / by[1]["hand_group_total_s"]
        print(
            f"16-VM total / 1-VM total: blktx {report['total_16_over_1']:.2f}x; "
            f"by hand for all VMs at once {report['hand_group_total_16_over_1']:.2f}x",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
