"""The executor's own overhead: N no-op ``sim.noop`` actions, committed and rolled back.

Each case runs in a child process so that its peak memory is its own. When
TaskFlow is installed (``pip install -e '.[bench]'``), the same N no-op tasks run
in a serial TaskFlow engine in the same run, and the ratio is printed.

    python bench/overhead.py                 # N = 1,000, 10,000, 100,000
    python bench/overhead.py --sizes 1000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any


def child_blktx(n: int, mode: str) -> dict[str, Any]:
    from blktx import ActionSpec, Executor, Transaction

    specs = [ActionSpec("sim.noop", {"key": str(i)}) for i in range(n)]
    if mode == "rollback":
        specs.append(ActionSpec("fault", {"phase": "invalidate"}))
    journal = None
    if mode == "journaled":
        import tempfile

        from blktx.journal import SqliteJournal

        journal = SqliteJournal(os.path.join(tempfile.mkdtemp(), "journal.sqlite"))  # a private folder
    executor = Executor(journal=journal)
    t = time.perf_counter()
    result = executor.run(Transaction(specs, base_dir="/tmp"))
    seconds = time.perf_counter() - t
    expected = "rolled back" if mode == "rollback" else "committed"
    assert result.outcome == expected, result.summary()
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_taskflow(n: int) -> dict[str, Any]:
    from taskflow import engines, task
    from taskflow.patterns import linear_flow

    class Noop(task.Task):  # type: ignore[misc]
        def execute(self) -> None:
            return None

    flow = linear_flow.Flow("noop")
    flow.add(*[Noop(name=f"t{i}") for i in range(n)])
    t = time.perf_counter()
    engines.run(flow, engine="serial")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(kind: str, n: int, mode: str = "commit") -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), mode], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} N={n} {mode} failed:\n{out.stderr}")
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--taskflow-size", type=int, default=1_000, help="N for the TaskFlow baseline")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, mode = args.child
        data = child_blktx(int(n), mode) if kind == "blktx" else child_taskflow(int(n))
        print(json.dumps(data))
        return 0

    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        for mode in ("commit", "rollback"):
            rows.append({"runner": "blktx", "n": n, "mode": mode, **measure("blktx", n, mode)})
            print(
                f"blktx    N={n:>7} {mode:<9} {rows[-1]['seconds']:8.3f} s  "
                f"{rows[-1]['seconds'] / n * 1e6:7.1f} us/action  peak {rows[-1]['peak_mb']:6.1f} MB",
                file=sys.stderr,
            )
    report: dict[str, Any] = {"rows": rows}
    by = {(r["n"], r["mode"]): r for r in rows}
    if (10_000, "commit") in by and (100_000, "commit") in by:
        report["growth_100k_over_10k"] = by[(100_000, "commit")]["seconds"] / by[(10_000, "commit")]["seconds"]
        report["peak_mb_100k"] = by[(100_000, "commit")]["peak_mb"]
    try:
        from blktx import journal  # noqa: F401
    except ImportError:
        pass
    else:
        n = 10_000
        base = by.get((n, "commit")) or measure("blktx", n)
        jr = measure("blktx", n, "journaled")
        rows.append({"runner": "blktx", "n": n, "mode": "journaled", **jr})
        report["journal_cost_10k"] = jr["seconds"] / base["seconds"]
    try:
        import taskflow  # noqa: F401
    except ImportError:
        report["taskflow"] = "not installed: pip install -e '.[bench]' for the baseline"
    else:
        n = args.taskflow_size
        tf = measure("taskflow", n)
        rows.append({"runner": "taskflow", "n": n, "mode": "commit", **tf})
        ours = by.get((n, "commit")) or measure("blktx", n)
        report["taskflow_over_blktx"] = tf["seconds"] / ours["seconds"]
        print(f"taskflow N={n:>7} commit    {tf['seconds']:8.3f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in ("taskflow_over_blktx", "growth_100k_over_10k", "peak_mb_100k", "journal_cost_10k"):
            if key in report:
                print(f"{key}: {report[key]:.2f}")
        if isinstance(report.get("taskflow"), str):
            print("taskflow:", report["taskflow"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
