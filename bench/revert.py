"""Reverting a group internal snapshot of N offline qcow2 images: ``blktx revert``
against a shell loop of ``qemu-img snapshot -a``, timed the same way, in the same run.

Each method is one whole process, timed from outside (start to exit), its output
read from a pipe:

- ``blktx``: ``python -m blktx revert app@s1 --journal J`` as a user runs it
  (journal and locks on; a safety snapshot of every image first, cancel able to
  put every image back until the commit point, the safety snapshots deleted after
  it);
- ``shell-loop``: ``sh -c 'for f; do qemu-img snapshot -a s1 "$f" || exit 1; done'``
  over the same images (no safety snapshot, no rollback: a failure half-way
  leaves the group half reverted).

Before each timed run, outside the timing: a fresh folder of N copies of one
template image (``--size``, its first ``--data`` bytes written with pattern 1 by
qemu-io), the group snapshot ``app@s1`` taken by a ``blktx run`` of a spec with
``group = "app"``, ``snapshot = "s1"`` (its own journal in the folder), pattern 9
written over the same bytes of every image after it (qemu-io), then ``sync`` (no
method pays another's write-back). ``BLKTX_JOURNAL`` and ``BLKTX_LOCK_DIR`` point
into the bench's private temporary folder. The methods run interleaved, the order
rotated each repeat; every run is verified after its timing: every image holds
pattern 1 again (qemu-io), and its only snapshot is ``s1`` (no safety snapshot
left). Printed: the median and range of each method, the median CPU time it
used (user + system, its own and its children's: the cost on a busy machine),
the ratio of the medians blktx / loop (the target: <= 1), and the load average
before and after (the machine may be shared).

    python bench/revert.py                          # N = 200, 5 repeats
    python bench/revert.py -n 50 --repeat 7 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

METHODS = ["blktx", "shell-loop"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GROUP, NAME = "app", "s1"
OLD, NEW = 1, 9  # the data of the group snapshot, and what is written after it


def run(argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out.stdout


def each(argvs: list[list[str]]) -> list[str]:
    """Run independent commands, as many at once as there are CPUs (preparation only)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(run, argvs))


def blktx(*args: str) -> list[str]:
    return [sys.executable, "-m", "blktx", *args]


def template(workdir: str, size: str, data: str) -> str:
    path = os.path.join(workdir, "template.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, size])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P {OLD} 0 {data}", path])
    return path


def fresh(n: int, source: str, data: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """A new folder of ``n`` images with the group snapshot app@s1 (taken by blktx,
    recorded in the folder's journal) and new data written after it."""
    d = tempfile.mkdtemp(prefix="blktx-bench-", dir=os.path.dirname(source))
    names = [f"d{i}.qcow2" for i in range(n)]
    for name in names:
        shutil.copyfile(source, os.path.join(d, name))
    lines = ["version = 1", f'group = "{GROUP}"', f'snapshot = "{NAME}"']
    for name in names:
        lines += ["[[action]]", 'type = "qcow2.internal-create"', f'image = "{name}"']
    with open(os.path.join(d, "app.toml"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    run(blktx("run", "app.toml", "--journal", "journal.sqlite", "--json"), cwd=d, env=env)
    paths = [os.path.join(d, name) for name in names]
    each([["qemu-io", "-f", "qcow2", "-c", f"write -P {NEW} 0 {data}", p] for p in paths])
    return d, paths


def argv_of(method: str, paths: list[str]) -> list[str]:
    if method == "blktx":
        return blktx("revert", f"{GROUP}@{NAME}", "--journal", "journal.sqlite")
    return [
        "sh",
        "-c",
        f'for f; do qemu-img snapshot -a {NAME} "$f" || exit 1; done',
        "loop",
        *[os.path.basename(p) for p in paths],
    ]


def verify(method: str, paths: list[str], data: str) -> None:
    """Every image holds the group snapshot's data again, and ``s1`` is its only snapshot."""
    sys.path.insert(0, ROOT)
    from blktx_plugins._image import read_header

    for p in paths:
        names = [s.name for s in read_header(p)[1]]
        assert names == [NAME], f"{method}: {p} has the snapshots {names} after the run, not only {NAME!r}"
    outs = each([["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {OLD} 0 {data}", p] for p in paths])
    bad = [p for p, out in zip(paths, outs, strict=True) if "verification failed" in out]
    assert not bad, f"{method}: {len(bad)} images do not hold the group snapshot's data (first: {bad[0]})"


def timed(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds of the process, and the CPU seconds (user + system) it and every
    process it waited for used: nothing else of the bench runs meanwhile."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu


def measure(
    n: int, repeat: int, args: argparse.Namespace, workdir: str, env: dict[str, str]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    source = template(workdir, args.size, args.data)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpus: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeat):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for method in order:
            d, paths = fresh(n, source, args.data, env)
            try:
                os.sync()  # the preparation's write-back is done before the clock starts
                seconds, cpu = timed(argv_of(method, paths), d, env)
                times[method].append(seconds)
                cpus[method].append(cpu)
                verify(method, paths, args.data)
            finally:
                shutil.rmtree(d)
        print(
            f"  N={n} repeat {r + 1}/{repeat} ({' then '.join(order)}): "
            + "  ".join(f"{m} {times[m][-1]:.3f} (cpu {cpus[m][-1]:.2f})" for m in METHODS)
            + f"   load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
    return times, cpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--images", type=int, default=200, help="images in the group (default 200)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each method (default 5, at least 5)")
    parser.add_argument("--size", default="16M", help="each image's virtual size (default 16M)")
    parser.add_argument("--data", default="1M", help="bytes written before the snapshot and over them after it (default 1M)")
    parser.add_argument("--dir", default=None, help="where the images are made (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON on stdout")
    args = parser.parse_args()
    if args.repeat < 5:
        parser.error("--repeat must be at least 5 (a median of fewer is not trusted here)")
    if args.images < 1:
        parser.error("-n must be at least 1")
    report: dict[str, Any] = {"cpus": os.cpu_count(), "n": args.images, "load_before": os.getloadavg()}
    workdir = tempfile.mkdtemp(prefix="blktx-bench-revert-", dir=args.dir)
    # Private journal default and lock folder: nothing of the user's is read or claimed.
    env = {
        **os.environ,
        "BLKTX_JOURNAL": os.path.join(workdir, "journal.sqlite"),
        "BLKTX_LOCK_DIR": os.path.join(workdir, "locks"),
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    env.pop("BLKTX_CRASH_AFTER", None)
    try:
        times, cpus = measure(args.images, args.repeat, args, workdir, env)
    finally:
        shutil.rmtree(workdir)
    report["load_after"] = os.getloadavg()
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["blktx"] / med["shell-loop"]
    report.update(
        {
            "median": {m: round(v, 4) for m, v in med.items()},
            "range": {m: [round(min(v), 4), round(max(v), 4)] for m, v in times.items()},
            "times": {m: [round(t, 4) for t in v] for m, v in times.items()},
            "cpu_seconds": {m: [round(t, 4) for t in v] for m, v in cpus.items()},
            "blktx_over_loop": round(ratio, 3),
        }
    )
    print(
        f"N={args.images} ({args.repeat} runs each, median [min-max] s; {args.size} images, {args.data} rewritten)",
        file=sys.stderr,
    )
    for m in METHODS:
        lo, hi = report["range"][m]
        print(f"  {m:<12} {med[m]:7.3f}  [{lo:.3f}-{hi:.3f}]   cpu {statistics.median(cpus[m]):.2f} s", file=sys.stderr)
    print(f"  blktx / loop {ratio:.2f}x (target <= 1)", file=sys.stderr)
    print(
        f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f} ({os.cpu_count()} CPUs)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
