"""The executor's own overhead: N no-op ``sim.noop`` actions, committed and rolled back.

Every method is one whole process timed from outside, start to exit, as a user
runs it: blktx through its CLI (``python -m blktx run --json --journal J SPEC``,
journal and locks on, ``BLKTX_LOCK_DIR`` a private folder, the JSON report
written to a file), and, when TaskFlow is installed (``pip install -e '.[bench]'``),
a Python process that builds a linear flow of N no-op tasks with revert methods
and runs it in TaskFlow's serial engine. A rollback is N no-ops and one failing
step last: blktx's ``fault`` action (``phase = "invalidate"``), TaskFlow's last
task raising. Each run is checked (outcome, action count, every no-op reverted).

Beside the whole-process time, the in-process figure: the run's own ``seconds``
from blktx's JSON report (``Executor.run_actions``: lock, check, do, invalidate,
cancel, journal; not reading the spec or printing), and the time of TaskFlow's
``engines.run`` (compile, prepare, run, revert; not building the flow).
Peak RSS is the whole process's (``wait4``'s ``ru_maxrss``).

Methods are interleaved, the order rotated every repeat; median [min-max] of
``--repeats`` runs. The CPU time other processes used meanwhile is printed: on
a shared machine every method shares the load alike.

    python bench/overhead.py                       # blktx 100 .. 100,000; TaskFlow 100, 1,000; 5 repeats
    python bench/overhead.py --sizes 10000 100000 --taskflow-sizes --repeats 3
    python bench/overhead.py --json
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

MODES = ("commit", "rollback")
#: Run at the TaskFlow sizes: TaskFlow as it runs by default (nothing persisted), with
#: its ``dir`` persistence, and blktx with nothing persisted (the like-for-like pairs).
TASKFLOW_METHODS = ("taskflow", "taskflow-dir", "blktx-memory")
#: (numerator, denominator, what the pair compares)
PAIRS = (
    ("taskflow", "blktx", "TaskFlow (nothing persisted) / blktx (journal fsynced, locks)"),
    ("taskflow", "blktx-memory", "like for like, nothing persisted: TaskFlow / blktx"),
    ("taskflow-dir", "blktx", "like for like, both persisted: TaskFlow dir backend (no fsync) / blktx (fsync)"),
)
#: The targets of issue 16, checked on the medians.
TASKFLOW_OVER_BLKTX = 100.0
GROWTH_100K_OVER_10K = 11.0
PEAK_MB_100K = 250.0


def child_taskflow(n: int, mode: str, persist: str | None = None) -> dict[str, Any]:
    """One TaskFlow run in this process: N no-op tasks (and a failing one last for a rollback);
    ``persist``: a folder for TaskFlow's ``dir`` persistence backend (its only local one
    without SQLAlchemy: a JSON file per flow and atom detail, written without fsync)."""
    from taskflow import engines, task
    from taskflow.patterns import linear_flow

    reverted = [0]

    class Noop(task.Task):  # type: ignore[misc]
        def execute(self) -> None:
            return None

        def revert(self, *args: Any, **kwargs: Any) -> None:
            reverted[0] += 1

    class Fault(task.Task):  # type: ignore[misc]
        def execute(self) -> None:
            raise RuntimeError("fault injected")

        def revert(self, *args: Any, **kwargs: Any) -> None:
            return None

    flow = linear_flow.Flow("noop")
    flow.add(*[Noop(name=f"t{i}") for i in range(n)])
    if mode == "rollback":
        flow.add(Fault(name="fault"))
    backend = {"backend": {"connection": "dir", "path": persist}} if persist else {}
    t = time.perf_counter()
    try:
        engines.run(flow, engine="serial", **backend)
        outcome = "committed"
    except RuntimeError as exc:
        assert str(exc) == "fault injected", exc
        outcome = "rolled back"
    return {"seconds": time.perf_counter() - t, "outcome": outcome, "reverted": reverted[0]}


def child_blktx_memory(spec: str) -> dict[str, Any]:
    """One blktx run in this process with nothing persisted (no journal, no locks), as
    TaskFlow's engine runs by default: the executor alone, the like-for-like figure."""
    from blktx.executor import Executor
    from blktx.spec import load_spec

    tx = load_spec(spec)
    result = Executor().run(tx)
    return {"seconds": result.seconds, "outcome": result.outcome, "actions": len(result.actions)}


def write_spec(folder: str, n: int, mode: str) -> str:
    path = os.path.join(folder, f"{mode}-{n}.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('version = 1\ndescription = "bench/overhead.py"\n')
        fh.writelines(f'[[action]]\ntype = "sim.noop"\nkey = "{i}"\n' for i in range(n))
        if mode == "rollback":
            fh.write('[[action]]\ntype = "fault"\nphase = "invalidate"\n')
    return path


#: What the bench needs of a blktx JSON report, read in a process of its own.
SUMMARY = (
    "import json, sys; d = json.load(open(sys.argv[1]))\n"
    "print(json.dumps({'outcome': d['outcome'], 'actions': len(d['actions']), 'seconds': d['seconds']}))"
)


def timed(argv: list[str], env: dict[str, str], out_path: str) -> tuple[float, float, int, str]:
    """Run ``argv`` to its exit: wall seconds, peak RSS in MB, exit status, stderr.

    The peak is ``wait4``'s ``ru_maxrss``; on Linux it counts the spawning parent's
    own peak too (the child starts in its memory until ``exec``), so this process
    never loads a report and prints its own peak, a floor under every figure."""
    with open(out_path, "wb") as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return seconds, usage.ru_maxrss / 1024, proc.returncode, err.read().decode(errors="replace")


def run_blktx(work: str, spec: str, n: int, mode: str) -> dict[str, Any]:
    folder = tempfile.mkdtemp(dir=work)  # a fresh journal and lock folder per run
    try:
        os.mkdir(os.path.join(folder, "locks"))
        env = {**os.environ, "BLKTX_LOCK_DIR": os.path.join(folder, "locks")}
        argv = [sys.executable, "-m", "blktx", "run", "--json", "--journal", os.path.join(folder, "journal.sqlite"), spec]
        out = os.path.join(folder, "report.json")
        os.sync()
        seconds, peak, status, err = timed(argv, env, out)
        # Read in another process: this one stays small (see timed).
        report = json.loads(subprocess.run([sys.executable, "-c", SUMMARY, out], capture_output=True, check=True).stdout)
    finally:
        shutil.rmtree(folder)
    expected = ("committed", 0, n) if mode == "commit" else ("rolled back", 1, n + 1)
    got = (report["outcome"], status, report["actions"])
    if got != expected:
        raise SystemExit(f"blktx N={n} {mode}: {got}, expected {expected}\n{err}")
    return {"seconds": seconds, "inner": report["seconds"], "peak_mb": peak}


def run_blktx_memory(work: str, spec: str, n: int, mode: str) -> dict[str, Any]:
    out = os.path.join(work, "blktx-memory.json")
    os.sync()
    seconds, peak, status, err = timed([sys.executable, __file__, "--child", "blktx-memory", spec, mode], dict(os.environ), out)
    with open(out, encoding="utf-8") as fh:
        report = json.loads(fh.read() or "{}")
    expected = ("committed", n) if mode == "commit" else ("rolled back", n + 1)
    if status != 0 or (report.get("outcome"), report.get("actions")) != expected:
        raise SystemExit(f"blktx-memory N={n} {mode}: status {status}, {report}, expected {expected}\n{err}")
    return {"seconds": seconds, "inner": report["seconds"], "peak_mb": peak}


def run_taskflow(work: str, n: int, mode: str, persist: bool = False) -> dict[str, Any]:
    out = os.path.join(work, "taskflow.json")
    folder = tempfile.mkdtemp(dir=work) if persist else ""
    os.sync()
    argv = [sys.executable, __file__, "--child", "taskflow-dir" if persist else "taskflow", str(n), mode, folder]
    seconds, peak, status, err = timed(argv, dict(os.environ), out)
    if folder:
        shutil.rmtree(folder)
    with open(out, encoding="utf-8") as fh:
        report = json.loads(fh.read() or "{}")
    expected = ("committed", 0) if mode == "commit" else ("rolled back", n)
    if status != 0 or (report.get("outcome"), report.get("reverted")) != expected:
        raise SystemExit(f"taskflow N={n} {mode}: status {status}, {report}, expected {expected}\n{err}")
    return {"seconds": seconds, "inner": report["seconds"], "peak_mb": peak}


def cpu_busy() -> float:
    """CPU-seconds every process on the machine has used (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU-seconds this process and its finished children have used."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime)


def own_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(sizes: list[int], tf_sizes: list[int], repeats: int) -> dict[str, Any]:
    cases = [("blktx", n, mode) for n in sorted(set(sizes) | set(tf_sizes)) for mode in MODES]
    cases += [(method, n, mode) for method in TASKFLOW_METHODS for n in tf_sizes for mode in MODES]
    cases.append(("python", 0, "start"))  # the floor of any whole process: `python -c pass`
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {case: [] for case in cases}
    work = tempfile.mkdtemp(prefix="blktx-overhead-")
    busy, own, started = cpu_busy(), own_cpu(), time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        specs = {(n, mode): write_spec(work, n, mode) for method, n, mode in cases if method == "blktx"}
        for r in range(repeats):
            shift = r * len(cases) // repeats
            for method, n, mode in cases[shift:] + cases[:shift]:
                if method == "blktx":
                    one = run_blktx(work, specs[(n, mode)], n, mode)
                elif method == "blktx-memory":
                    one = run_blktx_memory(work, specs[(n, mode)], n, mode)
                elif method.startswith("taskflow"):
                    one = run_taskflow(work, n, mode, persist=method == "taskflow-dir")
                else:
                    seconds, peak, _, _ = timed([sys.executable, "-c", "pass"], dict(os.environ), os.devnull)
                    one = {"seconds": seconds, "inner": 0.0, "peak_mb": peak}
                runs[(method, n, mode)].append(one)
    finally:
        shutil.rmtree(work)
    elapsed = time.monotonic() - started
    others = max(0.0, cpu_busy() - busy - (own_cpu() - own))
    rows = [
        {
            "method": method,
            "n": n,
            "mode": mode,
            "seconds": stats([x["seconds"] for x in got]),
            "inner": stats([x["inner"] for x in got]),
            "peak_mb": stats([x["peak_mb"] for x in got]),
            "runs": got,
        }
        for (method, n, mode), got in runs.items()
    ]
    return {
        "repeats": repeats,
        "rows": rows,
        "checks": checks(rows),
        "machine": {
            "cpus": os.cpu_count(),
            "elapsed": elapsed,
            "other_cpu_seconds": others,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "bench_peak_mb": own_peak_mb(),
        },
    }


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, on medians: TaskFlow/blktx, blktx's growth from 10k to 100k, its peak at 100k."""
    by = {(r["method"], r["n"], r["mode"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for (method, n, mode), row in by.items():
        for theirs, mine, what in PAIRS:
            ours = by.get((mine, n, mode))
            if method == theirs and ours:
                whole = row["seconds"]["median"] / ours["seconds"]["median"]
                inner = row["inner"]["median"] / ours["inner"]["median"]
                out.append({"what": f"{what}, N={n} {mode}", "whole": whole, "inner": inner, "target": ">= 100"})
    for mode in MODES:
        small, large = by.get(("blktx", 10_000, mode)), by.get(("blktx", 100_000, mode))
        if small and large:
            whole = large["seconds"]["median"] / small["seconds"]["median"]
            inner = large["inner"]["median"] / small["inner"]["median"]
            out.append({"what": f"blktx 100k / 10k {mode}", "whole": whole, "inner": inner, "target": "<= 11"})
        if large:
            peak = large["peak_mb"]["max"]
            out.append({"what": f"blktx N=100000 {mode} peak RSS MB (max of runs)", "value": peak, "target": "< 250"})
    for c in out:
        if "value" in c:
            c["met"] = c["value"] < PEAK_MB_100K
        elif c["target"] == ">= 100":
            c["met"] = {"whole": c["whole"] >= TASKFLOW_OVER_BLKTX, "inner": c["inner"] >= TASKFLOW_OVER_BLKTX}
        else:
            c["met"] = {"whole": c["whole"] <= GROWTH_100K_OVER_10K, "inner": c["inner"] <= GROWTH_100K_OVER_10K}
    return out


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['repeats']} runs each, interleaved; median [min-max]; whole process = start to exit, in-process = the run alone"
    )
    print(f"{'method':<12} {'N':>7} {'mode':<9} {'whole process s':<24} {'in-process s':<26} peak RSS MB")
    for r in sorted(report["rows"], key=lambda r: (r["n"], r["mode"], r["method"])):
        s, i, p = r["seconds"], r["inner"], r["peak_mb"]
        whole = f"{s['median']:7.3f} [{s['min']:.3f}-{s['max']:.3f}]"
        inner = f"{i['median']:8.4f} [{i['min']:.4f}-{i['max']:.4f}]"
        peak = f"{p['median']:6.1f} [{p['min']:.1f}-{p['max']:.1f}]"
        print(f"{r['method']:<12} {r['n']:>7} {r['mode']:<9} {whole:<24} {inner:<26} {peak}")
    for c in report["checks"]:
        if "value" in c:
            print(f"{c['what']}: {c['value']:.1f} (target {c['target']}: {'met' if c['met'] else 'NOT met'})")
        else:
            met = c["met"]
            print(
                f"{c['what']}: whole process {c['whole']:.2f}x ({'met' if met['whole'] else 'NOT met'}), "
                f"in-process {c['inner']:.2f}x ({'met' if met['inner'] else 'NOT met'}) (target {c['target']})"
            )
    m = report["machine"]
    others = m["other_cpu_seconds"]
    print(
        f"{m['cpus']} CPUs; {m['elapsed']:.0f} s elapsed; other processes used {others:.0f} CPU-s meanwhile "
        f"({others / m['elapsed']:.2f} cores); load average before {m['load_before']:.2f}, after {m['load_after']:.2f}; "
        f"bench process peak {m['bench_peak_mb']:.1f} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="N for blktx alone")
    parser.add_argument(
        "--taskflow-sizes",
        "--taskflow-size",
        type=int,
        nargs="*",
        default=[100, 1_000],
        help="N for blktx against TaskFlow (none: skip TaskFlow)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print every run as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, arg, mode, *rest = args.child
        if kind == "blktx-memory":
            print(json.dumps(child_blktx_memory(arg)))
        else:
            print(json.dumps(child_taskflow(int(arg), mode, rest[0] if kind == "taskflow-dir" else None)))
        return 0
    tf_sizes = args.taskflow_sizes
    try:
        import taskflow  # noqa: F401
    except ImportError:
        if tf_sizes:
            print("taskflow not installed (pip install -e '.[bench]'): blktx alone at those sizes", file=sys.stderr)
        sizes, tf_sizes = sorted(set(args.sizes) | set(tf_sizes)), []
    else:
        sizes = args.sizes
    report = bench(sizes, tf_sizes, args.repeats)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
