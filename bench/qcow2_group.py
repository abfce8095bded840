"""A group internal snapshot of N offline qcow2 images: blktx against hand-written
baselines, every method timed the same way, in the same run.

Each method is one whole process, timed from outside (start to exit):

- ``blktx``: ``python -m blktx run spec.toml --journal J`` as a user runs it
  (journal and locks on, its report printed to a pipe); ``blktx-json`` (optional,
  ``--methods``): the same with ``--json``, the report a script reads;
- ``shell-loop``: ``bash -c 'for f; do qemu-img snapshot -c nightly "$f"; done'``;
- ``one-daemon``: a hand-written Python script (stdlib only, raw QMP on a socket):
  one ``qemu-storage-daemon`` with every image, one ``transaction``, ``quit``;
- ``split-daemons``: the same with the images split over D daemons started at
  once, one ``transaction`` each sent to all before any reply is read (the best
  floor here: no journal, no checks, no ownership).

Before each timed run, outside the timing: a fresh folder of N copies of one
template image, the spec written, then ``sync`` (no method pays another's
write-back). The methods run interleaved, the order rotated each repeat; every
run is verified (each image has the snapshot) after its timing. Printed: the
median and the range of each method, the ratios of the medians, and the load
average before and after (the machine may be shared).

    python bench/qcow2_group.py                      # N = 500, 5 repeats
    python bench/qcow2_group.py --sizes 100 500 --repeat 7 --json
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

METHODS = ["blktx", "shell-loop", "one-daemon", "split-daemons"]
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "nightly"

#: The hand-written floors: stdlib only, QMP spoken directly on the daemons' sockets.
SCRIPT = r"""
import json, os, socket, subprocess, sys, time

def start(paths, sock):
    argv = ["qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=m", "--monitor", "chardev=m"]
    for i, p in enumerate(paths):
        argv += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": f"n{i}",
                                           "file": {"driver": "file", "filename": p}})]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)

def connect(sock):
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            time.sleep(0.001)
    f = s.makefile("rw")
    f.readline()  # greeting
    send(f, "qmp_capabilities")
    reply(f)
    return f

def send(f, name, args=None):
    f.write(json.dumps({"execute": name, "arguments": args or {}}) + "\n")
    f.flush()

def reply(f):
    while True:
        r = json.loads(f.readline())
        if "error" in r:
            sys.exit(f"QMP error: {r['error']}")
        if "return" in r:
            return r["return"]

daemons, name, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
k, rest = divmod(len(paths), daemons)
batches, at = [], 0
for i in range(daemons):
    batches.append(paths[at:at + k + (i < rest)])
    at += k + (i < rest)
folder = os.path.dirname(paths[0])
socks = [os.path.join(folder, f"qmp{i}.sock") for i in range(daemons)]
procs = [start(b, s) for b, s in zip(batches, socks)]
conns = [connect(s) for s in socks]
for f, b in zip(conns, batches):
    send(f, "transaction", {"actions": [{"type": "blockdev-snapshot-internal-sync",
                                         "data": {"device": f"n{i}", "name": name}} for i in range(len(b))]})
for f in conns:
    reply(f)
for f in conns:
    send(f, "quit")
for p in procs:
    if p.wait() != 0:
        sys.exit("a daemon failed")
"""


def default_daemons() -> int:
    sys.path.insert(0, os.path.dirname(HERE))
    from blktx_plugins._daemons import default_daemons as blktx_default

    return blktx_default()


def fresh(n: int, template: str) -> tuple[str, list[str]]:
    """A new folder of ``n`` copies of ``template`` and blktx's spec for them."""
    d = tempfile.mkdtemp(prefix="blktx-bench-", dir=os.path.dirname(template))
    paths = [os.path.join(d, f"d{i}.qcow2") for i in range(n)]
    for p in paths:
        shutil.copyfile(template, p)
    lines = ["version = 1"]
    for i in range(n):
        lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "d{i}.qcow2"', f'name = "{NAME}"']
    with open(os.path.join(d, "t.toml"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return d, paths


def argv_of(method: str, d: str, paths: list[str], daemons: int, script: str) -> list[str]:
    if method in ("blktx", "blktx-json"):
        return [
            sys.executable,
            "-m",
            "blktx",
            "run",
            os.path.join(d, "t.toml"),
            "--journal",
            os.path.join(d, "journal.sqlite"),
            *(["--json"] if method == "blktx-json" else []),
        ]
    if method == "shell-loop":
        return ["bash", "-c", f'for f; do qemu-img snapshot -c {NAME} "$f" || exit 1; done', "loop", *paths]
    count = 1 if method == "one-daemon" else daemons
    return [sys.executable, script, str(count), NAME, *paths]


def verify(paths: list[str]) -> None:
    from blktx_plugins._image import read_header

    for p in paths:
        assert [s.name for s in read_header(p)[1]] == [NAME], f"{p} has no snapshot {NAME!r} (only) after the run"


def timed(argv: list[str], cwd: str) -> float:
    t = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return seconds


def measure(n: int, repeat: int, daemons: int, methods: list[str], workdir: str) -> dict[str, list[float]]:
    template = os.path.join(workdir, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, "64M"], check=True)
    script = os.path.join(workdir, "by_hand.py")
    with open(script, "w") as fh:
        fh.write(SCRIPT)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeat):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            d, paths = fresh(n, template)
            try:
                os.sync()  # the copies' write-back is done before the clock starts
                times[method].append(timed(argv_of(method, d, paths, daemons, script), d))
                verify(paths)
            finally:
                shutil.rmtree(d)
        print(
            f"  N={n} repeat {r + 1}/{repeat}: "
            + "  ".join(f"{m} {times[m][-1]:.3f}" for m in methods)
            + f"   load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each method (default 5, at least 5)")
    parser.add_argument(
        "--daemons", type=int, default=0, help="daemons of the split-daemons floor (default: as many as blktx uses by default)"
    )
    parser.add_argument("--dir", default=None, help="where the images are made (default: $TMPDIR)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        choices=[*METHODS, "blktx-json"],
        help="which methods to run (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeat < 5:
        parser.error("--repeat must be at least 5 (a median of fewer is not trusted here)")
    daemons = args.daemons or default_daemons()
    methods = list(args.methods)
    for needed in METHODS:
        if needed not in methods:
            parser.error(f"--methods must include {needed} (the ratios are taken against it)")
    report: dict[str, Any] = {"cpus": os.cpu_count(), "daemons": daemons, "load_before": os.getloadavg(), "rows": []}
    workdir = tempfile.mkdtemp(prefix="blktx-bench-", dir=args.dir)
    try:
        for n in args.sizes:
            times = measure(n, args.repeat, daemons, methods, workdir)
            med = {m: statistics.median(v) for m, v in times.items()}
            row = {
                "n": n,
                "median": {m: round(v, 4) for m, v in med.items()},
                "range": {m: [round(min(v), 4), round(max(v), 4)] for m, v in times.items()},
                "blktx_over_one_daemon": round(med["blktx"] / med["one-daemon"], 3),
                "blktx_over_split": round(med["blktx"] / med["split-daemons"], 3),
                "shell_over_blktx": round(med["shell-loop"] / med["blktx"], 2),
            }
            report["rows"].append(row)
            print(f"N={n} ({args.repeat} runs each, median [min-max] s; split floor: {daemons} daemons)", file=sys.stderr)
            for m in methods:
                lo, hi = row["range"][m]
                print(f"  {m:<14} {med[m]:7.3f}  [{lo:.3f}-{hi:.3f}]", file=sys.stderr)
            print(
                f"  blktx / one-daemon {row['blktx_over_one_daemon']:.2f}x (target <= 0.6)   "
                f"blktx / split {row['blktx_over_split']:.2f}x   "
                f"shell-loop / blktx {row['shell_over_blktx']:.2f}x (target >= 2.5)",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(workdir)
    report["load_after"] = os.getloadavg()
    print(
        f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f} ({os.cpu_count()} CPUs)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
