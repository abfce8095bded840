"""A group internal snapshot of N qcow2 images: blktx against two baselines, same run.

(a) a shell loop of ``qemu-img snapshot -c`` one image after another, and
(b) one raw QMP ``transaction`` in one ``qemu-storage-daemon`` that opens every
image on its command line (the floor), versus
(c) blktx committing the same group with its journal and locks switched on.

    python bench/qcow2_group.py              # N = 100 and 500
    python bench/qcow2_group.py --sizes 500 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any


def images(n: int) -> tuple[str, list[str]]:
    d = tempfile.mkdtemp(prefix="blktx-bench-")
    template = os.path.join(d, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, "64M"], check=True)
    paths = []
    for i in range(n):
        p = os.path.join(d, f"d{i}.qcow2")
        shutil.copyfile(template, p)
        paths.append(p)
    os.unlink(template)
    return d, paths


def shell_loop(paths: list[str]) -> float:
    script = 'for f in "$@"; do qemu-img snapshot -c nightly "$f" || exit 1; done'
    t = time.perf_counter()
    subprocess.run(["bash", "-c", script, "loop", *paths], check=True)
    return time.perf_counter() - t


def raw_daemon(paths: list[str]) -> float:
    from blktx_plugins._qemu import Qmp

    sock = os.path.join(os.path.dirname(paths[0]), "qmp.sock")
    t = time.perf_counter()
    argv = ["qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=m",
            "--monitor", "chardev=m"]
    for i, p in enumerate(paths):
        argv += ["--blockdev", f"driver=file,node-name=f{i},filename={p}",
                 "--blockdev", f"driver=qcow2,node-name=n{i},file=f{i}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(sock):
        time.sleep(0.001)
    while True:
        try:
            qmp = Qmp(sock)
            break
        except Exception:  # noqa: BLE001 - the socket exists a moment before it listens
            time.sleep(0.001)
    qmp.cmd("transaction", {"actions": [
        {"type": "blockdev-snapshot-internal-sync", "data": {"device": f"n{i}", "name": "nightly"}}
        for i in range(len(paths))]})
    qmp.cmd("quit")
    qmp.close()
    proc.wait()
    return time.perf_counter() - t


def blktx_run(paths: list[str]) -> float:
    from blktx import ActionSpec, Executor, Transaction
    from blktx.journal import SqliteJournal
    from blktx.locks import Locker

    d = os.path.dirname(paths[0])
    journal = SqliteJournal(os.path.join(d, "journal.sqlite"))
    tx = Transaction([ActionSpec("qcow2.internal-create", {"image": p, "name": "nightly"}) for p in paths], base_dir=d)
    executor = Executor(journal=journal, locker=Locker(os.path.join(d, "locks")))
    t = time.perf_counter()
    result = executor.run(tx)
    seconds = time.perf_counter() - t
    assert result.outcome == "committed", result.summary()
    return seconds


def verify(paths: list[str]) -> None:
    for p in (paths[0], paths[-1]):
        out = subprocess.run(["qemu-img", "snapshot", "-l", p], capture_output=True, text=True, check=True).stdout
        assert "nightly" in out, f"{p} has no snapshot after the run"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--repeat", type=int, default=3, help="best of R runs of each (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import blktx.plugins

    blktx.plugins.default_registry()  # loaded once, as in a long-running caller
    report: dict[str, Any] = {"rows": []}
    for n in args.sizes:
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, func in (("shell-loop", shell_loop), ("raw-daemon", raw_daemon), ("blktx", blktx_run)):
                d, paths = images(n)
                try:
                    seconds = func(paths)
                    verify(paths)
                finally:
                    shutil.rmtree(d)
                best[name] = min(best.get(name, float("inf")), seconds)
        row = {"n": n, **{k: round(v, 4) for k, v in best.items()},
               "blktx_over_raw": round(best["blktx"] / best["raw-daemon"], 3),
               "shell_over_blktx": round(best["shell-loop"] / best["blktx"], 2)}
        report["rows"].append(row)
        print(f"N={n:>4}  shell loop {best['shell-loop']:7.3f} s   raw daemon {best['raw-daemon']:7.3f} s "
              f"({best['raw-daemon'] / n * 1000:.2f} ms/image)   blktx {best['blktx']:7.3f} s   "
              f"blktx/raw {row['blktx_over_raw']:.2f}x   shell/blktx {row['shell_over_blktx']:.1f}x", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
