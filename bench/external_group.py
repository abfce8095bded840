"""External snapshots of N offline qcow2 images with the device symlink layout: blktx
against a shell loop, every method timed the same way, in the same run.

Each method is one whole process, timed from outside (start to exit):

- ``blktx``: ``python -m blktx run spec.toml --journal J`` (journal and locks on):
  N ``qcow2.external-create`` actions, each a new overlay on its device's image
  and the device symlink re-pointed by compare and swap, all-or-none;
- ``shell-loop``: ``qemu-img create -f qcow2 -b IMAGE -F qcow2 OVERLAY`` and
  ``ln -sfn OVERLAY DEVICE`` per image (no journal, no checks, no rollback; not
  durable either: ``ln -sfn`` fsyncs nothing).

Before each timed run, outside the timing: a fresh folder of N small images with
their device symlinks, the spec written, then ``sync``. Methods interleaved, the
order rotated each repeat; every run verified (each device points at its overlay,
backed by its image) after its timing. Printed: median and range of each, the
ratio of the medians, the load average before and after.

    python bench/external_group.py                   # N = 500, 5 repeats
    python bench/external_group.py --sizes 100 500 --repeat 7 --json
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

METHODS = ["blktx", "shell-loop"]


def fresh(n: int, template: str) -> str:
    """A new folder of ``n`` images (copies of ``template``), a device symlink each, the spec."""
    d = tempfile.mkdtemp(prefix="blktx-bench-ext-", dir=os.path.dirname(template))
    lines = ["version = 1"]
    for i in range(n):
        shutil.copyfile(template, os.path.join(d, f"d{i}.base.qcow2"))
        os.symlink(f"d{i}.base.qcow2", os.path.join(d, f"d{i}"))
        lines += ["[[action]]", 'type = "qcow2.external-create"', f'device = "d{i}"', f'overlay = "d{i}.s1.qcow2"']
    with open(os.path.join(d, "t.toml"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return d


def argv_of(method: str, d: str, n: int) -> list[str]:
    if method == "blktx":
        return [sys.executable, "-m", "blktx", "run", os.path.join(d, "t.toml"), "--journal", os.path.join(d, "j.sqlite")]
    loop = (
        'for i in $(seq 0 $(($1 - 1))); do qemu-img create -q -f qcow2 -b "d$i.base.qcow2" -F qcow2 "d$i.s1.qcow2" '
        '&& ln -sfn "d$i.s1.qcow2" "d$i" || exit 1; done'
    )
    return ["bash", "-c", loop, "loop", str(n)]


def verify(d: str, n: int) -> None:
    for i in range(n):
        assert os.readlink(os.path.join(d, f"d{i}")) == f"d{i}.s1.qcow2", f"device d{i} not switched"


def timed(argv: list[str], cwd: str) -> float:
    t = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return seconds


def measure(n: int, repeat: int, workdir: str) -> dict[str, list[float]]:
    template = os.path.join(workdir, "template.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", template, "64M"], check=True)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeat):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for method in order:
            d = fresh(n, template)
            try:
                os.sync()  # the copies' write-back is done before the clock starts
                times[method].append(timed(argv_of(method, d, n), d))
                verify(d, n)
            finally:
                shutil.rmtree(d)
        print(f"  N={n} repeat {r + 1}/{repeat}: " + "  ".join(f"{m} {times[m][-1]:.3f}" for m in METHODS), file=sys.stderr)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each method (default 5, at least 5)")
    parser.add_argument("--dir", default=None, help="where the images are made (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeat < 5:
        parser.error("--repeat: at least 5")
    load = os.getloadavg()[0]
    report = {}
    workdir = tempfile.mkdtemp(prefix="blktx-bench-ext-", dir=args.dir)
    env_dir = tempfile.mkdtemp(prefix="blktx-bench-locks-")
    os.environ["BLKTX_LOCK_DIR"] = env_dir
    try:
        for n in args.sizes:
            times = measure(n, args.repeat, workdir)
            report[n] = {m: {"median": statistics.median(t), "min": min(t), "max": max(t)} for m, t in times.items()}
    finally:
        shutil.rmtree(workdir)
        shutil.rmtree(env_dir)
    if args.json:
        print(json.dumps({"report": report, "load": [load, os.getloadavg()[0]]}, indent=2))
        return 0
    print(f"{'N':>6} {'method':<12} {'median s':>9}  range")
    for n, row in report.items():
        for m, v in row.items():
            print(f"{n:>6} {m:<12} {v['median']:9.3f}  [{v['min']:.3f}-{v['max']:.3f}]")
        ratio = row["shell-loop"]["median"] / row["blktx"]["median"]
        print(f"{n:>6} shell-loop / blktx = {ratio:.2f}x (target >= 2)")
    print(f"load average before {load:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
