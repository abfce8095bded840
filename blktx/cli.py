"""The ``blktx`` command: parses arguments, calls the library, prints. Nothing more."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from blktx import cli_groups, plugins
from blktx.context import QUIESCE_MODES
from blktx.errors import EXIT_INVALID, BlktxError, InvalidTransaction, Problem
from blktx.executor import Executor
from blktx.plain import record, shown
from blktx.report import Progress, console, print_json, print_result, print_shown, print_types, table, types_json
from blktx.result import Result
from blktx.spec import Transaction, load_spec
from blktx.states import TxLifecycle, TxState

EXIT_HELP = """exit status:
  0  committed: every action took effect
  1  rolled back: nothing changed; the failure is reported
  2  invalid: the spec, a check, a lock or the command line refused; nothing was touched
  3  needs recovery: a cancel or finalize step failed, or a run was killed;
     `blktx recover` finishes it
"""

EXAMPLES = {
    "run": [
        "blktx run nightly.toml",
        "blktx run --json --wait 30 --root /srv/images nightly.toml",
        "generate-spec | blktx run -          # a spec on stdin; paths relative to the current folder",
    ],
    "check": ["blktx check nightly.toml            # validate and run every check; touches nothing"],
    "types": ["blktx types", "blktx types --json | jq '.types[].name'"],
    "graph": [
        "blktx graph qcow2.internal-create   # an action type's machine (Mermaid)",
        "blktx graph transaction            # the transaction's own machine",
    ],
    "demo": ["blktx demo --dir /tmp/blktx-demo"],
    "recover": [
        "blktx recover                       # every unfinished transaction of the journal",
        "blktx recover 20261127T0512 --allow-exec   # one, whose cancels run commands",
        "blktx recover --forget 20261127T0512     # what it left is settled by hand: release it",
    ],
    "log": ["blktx log --limit 50", "blktx log --json"],
    "show": ["blktx show 20261127T0512            # a unique prefix is enough"],
    "list": ["blktx list web --verify", "blktx list --max-age 25h web        # exit 1 when the newest is older (monitoring)"],
    **cli_groups.EXAMPLES,
    "schema": ["blktx schema -o blktx.schema.json  # for editors: #:schema ./blktx.schema.json"],
}

ENV_HELP = """
environment:
  BLKTX_JOURNAL=PATH        the journal (default /var/lib/blktx/journal.sqlite as root,
                            else ~/.local/state/blktx/journal.sqlite)
  BLKTX_LOCK_DIR=DIR        where runs claim their targets, whichever journal they use
                            (default /var/lib/blktx/locks as root, else ~/.local/state/blktx/locks)
  BLKTX_LOAD_PLUGINS=a,b    load only these plugins (entry-point names); empty: none
  BLKTX_TRACE_HOOKS=1       print every plugin hook call to stderr
  BLKTX_CRASH_AFTER=N       drills: SIGKILL the run right after its N-th journal write
  BLKTX_WATCHDOG=0          drills: no dead-man switch (as if a power loss took it too);
                            holds then wait for `blktx recover`
"""


def _registry(args: argparse.Namespace, *, lazy: bool = False) -> plugins.Registry:
    registry = plugins.default_registry(lazy=lazy)
    if not getattr(args, "json", False):
        err = console(sys.stderr)
        for problem in registry.problems:
            err.print(f"[yellow]warning[/yellow]: {record(str(problem))}", highlight=False)
    return registry


def _emit(result: Result, args: argparse.Namespace) -> int:
    if args.json:
        print_json(result)  # streamed, action by action: the report never exists whole
    else:
        print_result(result, console())
    return result.exit_status


def _invalid(exc: InvalidTransaction, args: argparse.Namespace) -> int:
    return _emit(Result("-", TxState.INVALID, problems=exc.problems), args)


def _load(args: argparse.Namespace) -> Transaction | int:
    """The spec, or the exit status after reporting why it could not be read."""
    try:
        return load_spec(args.spec)
    except InvalidTransaction as exc:
        return _invalid(exc, args)


def cmd_run(args: argparse.Namespace) -> int:
    registry = _registry(args, lazy=True)  # only the spec's types' built-in plugins are imported
    tx = _load(args)
    if isinstance(tx, int):
        return tx
    if not args.json and sys.stderr.isatty():
        registry.pm.register(Progress(sys.stderr), name="blktx-progress")
    executor = Executor(registry, journal=_journal(args), locker=_locker(args))
    bound = executor.bind(tx, allow_exec=args.allow_exec, roots=_roots(args), overrides=_overrides(args), **_trust(args))
    if isinstance(bound, Result):
        return _emit(bound, args)
    txid, actions, options = bound
    base_dir, file, description = tx.base_dir, tx.file, tx.description
    # The parsed document and its line map served bind; the run keeps only its actions
    # (at 100,000 actions they are ~130 MB that would live to the end of the run).
    del tx
    result = executor.run_actions(actions, options, base_dir=base_dir, file=file, txid=txid, description=description)
    return _emit(result, args)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Options given on the command line, which replace the spec's."""
    overrides: dict[str, Any] = {}
    if getattr(args, "jobs", None) is not None:
        overrides["jobs"] = args.jobs
    if args.quiesce is not None:
        overrides["quiesce"] = args.quiesce
    return overrides


def cmd_check(args: argparse.Namespace) -> int:
    registry = _registry(args, lazy=True)
    tx = _load(args)
    if isinstance(tx, int):
        return tx
    return _emit(
        Executor(registry).check(tx, allow_exec=args.allow_exec, roots=_roots(args), overrides=_overrides(args), **_trust(args)),
        args,
    )


def cmd_types(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.json:
        print_json(
            {"types": types_json(registry), "problems": [{"plugin": p.plugin, "message": p.message} for p in registry.problems]}
        )
    else:
        print_types(registry, console())
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    if args.type == "transaction":
        if args.json:
            print_json({"type": "transaction", **TxLifecycle.as_dict()})
        else:
            sys.stdout.write(TxLifecycle.mermaid())
        return 0
    registry = _registry(args)
    entry = registry.types.get(args.type)
    if entry is None:
        hint = registry.unknown(args.type, others=("transaction",))
        print(f"blktx graph: unknown action type {args.type!r} ({hint})", file=sys.stderr)
        return EXIT_INVALID
    lifecycle = entry.cls.lifecycle
    if entry.cls.finalize:  # runs only after the commit point: never cancelled
        from dataclasses import replace

        lifecycle = replace(
            lifecycle, transitions=tuple(t for t in lifecycle.transitions if t.trigger not in ("cancel", "cancel_failed"))
        )
    if args.json:
        print_json({"type": args.type, "finalize": entry.cls.finalize, **lifecycle.as_dict()})
    else:
        sys.stdout.write(
            lifecycle.mermaid(
                title=args.type + (" (finalize: runs after the commit point, never cancelled)" if entry.cls.finalize else "")
            )
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from blktx.demo import DemoError, run_demo

    registry = _registry(args)
    try:
        results, info = run_demo(
            args.dir, registry, None if args.json else console(), journal=_journal(args), locker=_locker(args)
        )
    except DemoError as exc:
        print(f"blktx demo: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print_json({"results": [r.to_json() for r in results], **info})
    ok = [r.outcome for r in results] == ["committed", "rolled back"] and info["rollback_left_world_unchanged"]
    return 0 if ok else 1


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from blktx.schema import schema

    text = json.dumps(schema(_registry(args)), indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _trust(args: argparse.Namespace) -> dict[str, Any]:
    """What the caller allows beyond the safe defaults (docs/security.md)."""
    return {
        "vm_roots": [os.path.abspath(r) for r in args.vm_root or []],
        "allow_tcp": args.allow_tcp,
        "shared_folders": args.allow_shared_folders,
    }


def _roots(args: argparse.Namespace) -> list[str] | None:
    roots: list[str] = [os.path.abspath(r) for r in args.root or []]
    if roots:
        roots.append(os.path.dirname(os.path.abspath(args.spec)))
    return roots or None


def _journal(args: argparse.Namespace) -> Any:
    """The run's journal (also its locker), or None with --no-journal."""
    if getattr(args, "no_journal", False):
        return None
    cached = getattr(args, "_journal_obj", None)
    if cached is None:
        from blktx.journal import SqliteJournal

        cached = SqliteJournal(args.journal)
        args._journal_obj = cached
    return cached


def _locker(args: argparse.Namespace) -> Any:
    """The locker of every run: claims in the one well-known folder. A run without a
    journal claims too (it must never act on another transaction's targets); its
    claim is stale once it is dead, since nothing could recover it."""
    from blktx.locks import Locker

    return Locker(wait=getattr(args, "wait", 0.0) or 0.0)


def cmd_recover(args: argparse.Namespace) -> int:
    from blktx.recover import recover

    registry = _registry(args)
    if args.forget:
        from blktx.recover import forget

        if not args.txid:
            print("blktx recover: --forget needs the transaction id (`blktx log` lists them)", file=sys.stderr)
            return EXIT_INVALID
        report = [forget(_journal(args), _locker(args), args.txid)]
    else:
        report = recover(_journal(args), registry, _locker(args), args.txid, allow_exec=args.allow_exec)
    if args.json:
        print_json({"journal": _journal(args).path, "transactions": report})
    else:
        out = console()
        if not report:
            out.print(f"nothing to recover in {shown(_journal(args).path)}", markup=False)
        for item in report:
            how = f" ({item['message']})" if item["message"] != item["outcome"] else ""
            out.print(shown(f"{item['txid']}: {item['outcome']}{how}"), markup=False)
            for left in item.get("left", []):
                out.print(f"    left: {shown(str(left))}", markup=False)
            for warning in item.get("warnings", []):
                out.print(f"    warning: {shown(str(warning))}", markup=False)
    if any(i["outcome"] == "invalid" for i in report):
        return EXIT_INVALID
    # A transaction whose run is alive is not this recover's to finish (nor a failure):
    # it is reported and left to its run, so that a timer's `recover` before its own
    # run does not fail because a manual revert or another group is running.
    return 3 if any(i["outcome"] == "needs recovery" for i in report) else 0


def cmd_log(args: argparse.Namespace) -> int:
    import time

    txs = _journal(args).transactions(limit=args.limit)
    if args.json:
        print_json({"journal": _journal(args).path, "transactions": txs})
        return 0
    out = console()
    rows = table(out)
    for col in ("txid", "started", "outcome", "state", "actions", "seconds", "spec", "description"):
        rows.add_column(col, no_wrap=col in ("txid", "started", "outcome", "state"))
    for t in txs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["started"]))
        secs = f"{t['seconds']:.3f}" if t["seconds"] is not None else "-"
        rows.add_row(
            t["txid"],
            started,
            t["outcome"],
            t["status"],
            str(t["actions"]),
            secs,
            record(t["file"] or "(python)"),
            record(t["description"] or ""),
        )
    out.print(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    tx = _journal(args).transaction(args.txid)
    if tx is None:
        print(
            f"blktx show: no single transaction matches {args.txid!r} in {_journal(args).path} (`blktx log` lists them)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if args.json:
        print_json(tx)
        return 0
    print_shown(tx, console())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import time

    from blktx.catalog import check_name, verify
    from blktx.context import duration

    why = check_name(args.group, "group") if args.group is not None else None
    if why:
        return _emit(Result("-", TxState.INVALID, problems=[Problem(why, "command line", key="group")]), args)
    journal = _journal(args)
    entries = journal.group_snapshots(args.group)
    registry = _registry(args) if args.verify else None
    now = time.time()
    for e in entries:
        e["age_seconds"] = round(now - e["time"], 3)
        if registry is not None:
            e["members"] = verify(e, registry)
            known = [m["present"] for m in e["members"]]
            e["state"] = "incomplete" if False in known else "complete" if all(known) else "unverified"
        else:
            e["state"] = "recorded"
    status = 0
    stale = ""
    if args.max_age is not None:
        limit = duration(args.max_age)
        fresh = [e for e in entries if e["state"] in ("complete", "recorded")]
        newest = max((e["time"] for e in fresh), default=None)
        if newest is None or now - newest > limit:
            status = 1
            stale = f"no complete group snapshot{' of ' + args.group if args.group else ''} is newer than {args.max_age}" + (
                f" (newest {now - newest:.0f} s old)" if newest else ""
            )
    if args.json:
        print_json({"journal": journal.path, "group_snapshots": entries, **({"stale": stale} if stale else {})})
        return status
    out = console()
    rows = table(out)
    for col in ("group", "name", "taken", "age", "members", "state", "txid"):
        rows.add_column(col, no_wrap=col in ("taken", "age", "state", "txid"))
    for e in entries:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        missing = [m for m in e["members"] if m.get("present") is False]
        state = e["state"] + (f" ({len(missing)} missing)" if missing else "")
        rows.add_row(
            record(e["group"]), record(e["name"]), taken, _age(e["age_seconds"]), str(len(e["members"])), state, e["txid"]
        )
    out.print(rows)
    for e in entries:
        for m in e["members"]:
            if m.get("present") is False:
                out.print(
                    shown(
                        f"{e['group']}@{e['name']}: member #{m['index']} {m['type']} on {m['target']} is gone"
                        + (f" ({m['why']})" if m.get("why") else "")
                    ),
                    markup=False,
                )
    if stale:
        print(f"blktx list: {stale}", file=sys.stderr)
    return status


def _duration_arg(text: str) -> str:
    """``--max-age``: a duration blktx understands, or argparse's usage error (exit 2)."""
    from blktx.context import duration

    try:
        duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration ({exc}); e.g. 90m, 25h, 2d") from None
    return text


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the transaction's TOML file (see specs/README.md); - reads it from stdin")
    p.add_argument("--allow-exec", action="store_true", help="allow actions that run external commands (exec); off by default")
    p.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="also allow paths under DIR (default: only the spec's directory); repeatable",
    )
    p.add_argument(
        "--vm-root",
        action="append",
        metavar="DIR",
        help="also allow VM and guest-agent sockets under DIR (e.g. /run/vms); repeatable",
    )
    p.add_argument(
        "--allow-tcp",
        action="store_true",
        help="allow tcp:HOST:PORT VM and agent addresses (anyone reaching the port could answer)",
    )
    p.add_argument(
        "--allow-shared-folders",
        action="store_true",
        help="allow paths in folders that other users can write (see docs/security.md)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``only``, that command's alone (a run builds
    one subcommand's parser, not thirteen: ~3 ms of every start)."""
    parser = argparse.ArgumentParser(
        prog="blktx",
        description="Group snapshots of many block devices as one all-or-none transaction.",
        epilog=EXIT_HELP + ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from blktx import __version__

    parser.add_argument("--version", action="version", version=f"blktx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("run", "run a transaction all-or-none", cmd_run),
        ("check", "validate a spec and run every check; touches nothing", cmd_check),
        ("types", "list every registered action type, its parameters and its plugin", cmd_types),
        ("graph", "print an action type's (or the transaction's) state machine as a Mermaid diagram", cmd_graph),
        ("demo", "snapshot real qcow2 images: one group that commits, one that rolls back", cmd_demo),
        ("recover", "roll back or forward every transaction a dead run left unfinished", cmd_recover),
        ("log", "list recent transactions from the journal", cmd_log),
        ("show", "show one transaction from the journal: every action, state, timing, error", cmd_show),
        ("list", "list group snapshots: members, age, and with --verify whether each member is still there", cmd_list),
        ("revert", "bring every member of a group snapshot back to it, all or none", cli_groups.cmd_revert),
        ("delete", "delete group snapshots, all or none (after the commit point, finished by recover)", cli_groups.cmd_delete),
        ("prune", "delete the group snapshots a retention policy does not keep (--dry-run: list them)", cli_groups.cmd_prune),
        ("schema", "print a JSON Schema of the spec format with every installed type's parameters", cmd_schema),
    ]
    subs: dict[str, argparse.ArgumentParser] = {}
    for name, help_text, func in commands:
        if only is not None and name != only:
            continue
        epilog = "example:\n" + "".join(f"  {line}\n" for line in EXAMPLES[name])
        if name in ("run", "check", "recover", "demo", "revert", "delete", "prune"):
            epilog += "\n" + EXIT_HELP
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text.capitalize() + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
        subs[name] = p

    def on(*names: str) -> list[argparse.ArgumentParser]:
        return [subs[n] for n in names if n in subs]

    for sp in on("run", "check"):
        _add_spec_args(sp)
    cli_groups.add_arguments(subs)
    for sp in on("run", "demo", "recover", "log", "show", "list", "revert", "delete", "prune"):
        sp.add_argument(
            "--journal",
            metavar="PATH",
            help="the journal (default $BLKTX_JOURNAL, or /var/lib/blktx/journal.sqlite as root, else ~/.local/state/blktx/)",
        )
    for sp in on("run", "demo"):
        sp.add_argument(
            "--no-journal",
            action="store_true",
            help="keep no journal: no crash recovery (targets are still claimed while it runs)",
        )
    for sp in on("run"):
        sp.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="wait up to SECONDS for targets locked by another run (default: refuse at once)",
        )
    for sp in on("schema"):
        sp.add_argument("--output", "-o", metavar="FILE", help="write it to FILE instead of stdout")
    for sp in on("recover"):
        sp.add_argument("txid", nargs="?", help="only this transaction (a prefix is enough)")
        sp.add_argument(
            "--forget", action="store_true", help="with TXID: what it left is settled by hand; end it and release its targets"
        )
        sp.add_argument(
            "--allow-exec",
            action="store_true",
            help="allow cancel commands of exec actions to run (never taken from the journal)",
        )
    for sp in on("log"):
        sp.add_argument("--limit", type=int, default=20, help="how many transactions (default 20)")
    for sp in on("show"):
        sp.add_argument("txid", help="the transaction id (a unique prefix is enough); see `blktx log`")
    for sp in on("list"):
        sp.add_argument("group", nargs="?", help="only this group")
        sp.add_argument(
            "--verify",
            action="store_true",
            help="check each member is still there, by its identity (snapshot id and date, inode, UUID)",
        )
        sp.add_argument(
            "--max-age",
            metavar="DURATION",
            type=_duration_arg,
            help="exit 1 when the newest complete group snapshot is older (e.g. 25h, 90m)",
        )
    for sp in on("run"):
        sp.add_argument("--jobs", type=int, metavar="N", help="run up to N steps at once (overrides the spec)")
    for sp in on("run", "check"):
        sp.add_argument(
            "--quiesce",
            choices=QUIESCE_MODES,
            metavar="MODE",
            help="overrides the spec's quiesce mode: " + ", ".join(QUIESCE_MODES),
        )
    for sp in on("graph"):
        sp.add_argument("type", help="an action type, e.g. qcow2.internal-create, or `transaction`")
    for sp in on("demo"):
        sp.add_argument(
            "--dir", default="blktx-demo", help="where to make the demo's images (default ./blktx-demo; remade on each run)"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(given) if not a.startswith("-")), None)
    only = given[first] if first is not None and given[first] in EXAMPLES and not given[:first] else None
    parser = build_parser(only)
    args = parser.parse_args(given)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("blktx: interrupted", file=sys.stderr)
        return 130
    except BlktxError as exc:  # refused before anything ran
        print(f"blktx {args.command}: {shown(str(exc))}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 - a message, never a traceback
        changes = args.command in ("run", "recover", "demo", "revert", "delete", "prune")
        print(
            f"blktx {args.command}: {type(exc).__name__}: {shown(str(exc))}"
            + ("; the journal knows what may be left: run `blktx recover`" if changes else ""),
            file=sys.stderr,
        )
        return 3 if changes else EXIT_INVALID
    finally:
        journal = getattr(args, "_journal_obj", None)
        if journal is not None:  # closed here, not by a collection at exit (see entry)
            with contextlib.suppress(Exception):
                journal.close()
    return status


def entry() -> int:
    """The ``blktx`` command and ``python -m blktx``: :func:`main`, then the process's
    objects frozen, so that the interpreter's last collections skip them (~10 ms of
    every command; the journal is closed by then, nothing else waits for a collection)."""
    status = main()
    import gc

    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(entry())
