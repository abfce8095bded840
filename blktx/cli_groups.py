"""``blktx revert``, ``delete`` and ``prune``: group snapshots of the catalog turned into
transactions (:func:`blktx.catalog.plan`) and run like any other, all-or-none and
recoverable. Parses nothing but its own arguments; prints through :mod:`blktx.report`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from blktx.errors import InvalidTransaction, Problem
from blktx.plain import shown
from blktx.report import console, print_json
from blktx.result import Result
from blktx.states import TxState


def _cli() -> Any:
    from blktx import cli

    return cli


def _entry(args: argparse.Namespace, ref: str) -> dict[str, Any] | Problem:
    """The catalog entry ``GROUP@NAME`` names, or the problem saying why there is none."""
    from blktx.catalog import check_name, label

    group, at, name = ref.partition("@")
    why = check_name(group, "group") or check_name(name, "snapshot name") if at else None
    if not at or not group or not name or why:
        return Problem(
            why or f"{ref!r} is not GROUP@NAME",
            "command line",
            hint="`blktx list` shows the group snapshots, e.g. web@nightly-20261127",
        )
    journal = _cli()._journal(args)
    entry = journal.group_snapshot(group, name)
    if entry is None:
        known = [label(e) for e in journal.group_snapshots(group)][-5:]
        return Problem(
            f"no group snapshot {ref} in {journal.path}",
            "command line",
            hint=("the newest of the group: " + ", ".join(known)) if known else "`blktx list` shows the group snapshots",
        )
    return entry  # type: ignore[no-any-return]


def _refuse(args: argparse.Namespace, problems: list[Problem]) -> int:
    status: int = _cli()._emit(Result("-", TxState.INVALID, problems=problems), args)
    return status


def _trust_of(args: argparse.Namespace, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The roots, VM roots and tcp permission the transactions that made ``entries``
    ran with (their journaled options); refused when one's record is gone."""
    journal = _cli()._journal(args)
    roots: list[str] = []
    vm_roots: list[str] = []
    allow_tcp = False
    problems = []
    for e in entries:
        made = journal.transaction(e["txid"])
        options = (made or {}).get("options") or {}
        if not options.get("roots"):
            problems.append(
                Problem(
                    f"the journal no longer holds the run that made {e['group']}@{e['name']} ({e['txid']}): "
                    "the folders its members may be in are unknown",
                    "command line",
                    hint="delete its members by hand, then remove the entry with --missing-ok",
                )
            )
            continue
        roots += [r for r in options["roots"] if r not in roots]
        vm_roots += [r for r in options.get("vm_roots") or [] if r not in vm_roots]
        allow_tcp = allow_tcp or bool(options.get("allow_tcp"))
    if problems:
        raise InvalidTransaction(problems)
    return {"roots": roots, "vm_roots": vm_roots, "allow_tcp": allow_tcp}


def _forget_only(args: argparse.Namespace, entries: list[dict[str, Any]]) -> int:
    """Group snapshots none of whose members is left: only their catalog entries go
    (one write; nothing else exists to touch)."""
    from blktx.catalog import label

    _cli()._journal(args).uncatalog(tuple(e["txid"] for e in entries))
    names = [label(e) for e in entries]
    if args.json:
        print_json({"outcome": "committed", "exit_status": 0, "forgotten": names, "why": "no member was left"})
    else:
        console().print(shown(f"no member was left of {', '.join(names)}: removed from the catalog"), markup=False)
    return 0


def _run_plan(args: argparse.Namespace, entries: list[dict[str, Any]], purpose: str) -> int:
    """Plan the revert or delete of ``entries`` and run it as one transaction."""
    from blktx.catalog import plan
    from blktx.executor import Executor, new_txid
    from blktx.report import Progress
    from blktx.spec import bind

    cli = _cli()
    registry = cli._registry(args)
    try:
        tx = plan(
            entries,
            purpose,
            registry,
            missing_ok=getattr(args, "missing_ok", False),
            keep_current=getattr(args, "keep_current", False),
            discard_current=getattr(args, "discard_current", False),
        )
        if purpose == "delete" and not tx.actions:  # --missing-ok, and not one member left
            return _forget_only(args, entries)
        txid = new_txid()
        # The trust the group snapshots were made under, never more: their runs' roots,
        # VM roots and tcp permission (journaled with each), so that what a revert or
        # delete resolves today (a symlink re-pointed, a backing file renamed) is confined
        # as it was then. Shared folders only if the caller allows them now.
        trust = _trust_of(args, entries)
        actions, options = bind(tx, registry, txid=txid, shared_folders=args.allow_shared_folders, **trust)
    except InvalidTransaction as exc:
        status: int = cli._invalid(exc, args)
        return status
    options.group, options.snapshot, options.group_defaulted = "", "", False
    if purpose == "revert":
        # What the members held before the revert and is kept (--keep-current; an external
        # member's branch unless --discard-current) is a group snapshot of its own, listed,
        # to revert to or delete; each revert type's catalog_member says what it kept.
        options.group, options.snapshot = entries[0]["group"], f"before-revert-{txid}"
    options.forgets = tuple(e["txid"] for e in entries) if purpose == "delete" else ()
    if not args.json and sys.stderr.isatty():
        registry.pm.register(Progress(sys.stderr), name="blktx-progress")
    executor = Executor(registry, journal=cli._journal(args), locker=cli._locker(args))
    result = executor.run_actions(actions, options, base_dir="/", file=tx.file, txid=txid, description=tx.description)
    return cli._emit(result, args)  # type: ignore[no-any-return]


def cmd_revert(args: argparse.Namespace) -> int:
    entry = _entry(args, args.ref)
    if isinstance(entry, Problem):
        return _refuse(args, [entry])
    return _run_plan(args, [entry], "revert")


def cmd_delete(args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for ref in dict.fromkeys(args.ref):
        entry = _entry(args, ref)
        if isinstance(entry, Problem):
            problems.append(entry)
        else:
            entries.append(entry)
    if problems:
        return _refuse(args, problems)
    return _run_plan(args, entries, "delete")


def _policy(args: argparse.Namespace) -> tuple[str, Any] | Problem:
    """The group and retention policy to prune by: the command line's, else the spec's."""
    from blktx.catalog import check_name, default_group
    from blktx.retention import parse_keep_arg, parse_policy
    from blktx.spec import load_spec

    group, policy = args.group, None
    if args.spec:
        try:
            tx = load_spec(args.spec)
        except InvalidTransaction as exc:
            return exc.problems[0]
        raw_group = (tx.raw or {}).get("group", "")
        if not isinstance(raw_group, str):
            return Problem("'group' must be a string", tx.file, tx.where("group")[0], key="group")
        group = group or tx.group or default_group(tx.file)
        keep = (tx.raw or {}).get("retention", {}).get("keep") if isinstance((tx.raw or {}).get("retention"), dict) else None
        if keep is not None and not args.keep:
            try:
                policy = parse_policy(keep)
            except ValueError as exc:
                line, _ = tx.where("retention", "keep")
                return Problem(f"[retention] keep: {exc}", tx.file, line, key="keep")
    if args.keep:
        try:
            policy = parse_keep_arg(args.keep)
        except ValueError as exc:
            return Problem(f"--keep {args.keep!r}: {exc}", "command line", hint="e.g. --keep last=3,daily=7,weekly=4")
    if not group:
        return Problem("which group? give GROUP or --spec FILE", "command line", hint="blktx prune web --keep daily=7")
    why = check_name(group, "group")
    if why:
        return Problem(why, args.spec or "command line", key="group")
    if policy is None or policy.empty():
        return Problem(
            f"no retention policy for group {group!r}: prune would delete every group snapshot",
            args.spec or "command line",
            hint="give --keep last=3,daily=7 or [retention] keep = {...} in the spec (--spec FILE)",
        )
    return group, policy


def cmd_prune(args: argparse.Namespace) -> int:
    from blktx.catalog import label
    from blktx.retention import describe, select

    found = _policy(args)
    if isinstance(found, Problem):
        return _refuse(args, [found])
    group, policy = found
    journal = _cli()._journal(args)
    entries = journal.group_snapshots(group)
    kept = select([(e["txid"], e["time"]) for e in entries], policy)
    doomed = [e for e in entries if e["txid"] not in kept]
    if args.dry_run:
        return _show_prune(args, group, describe(policy), entries, kept)
    if not doomed:
        if args.json:
            print_json({"group": group, "policy": describe(policy), "deleted": [], "outcome": "nothing to prune"})
        else:
            console().print(
                shown(f"nothing to prune in {group}: {len(entries)} group snapshots, all kept by {describe(policy)}"),
                markup=False,
            )
        return 0
    if not args.json:
        console().print(
            shown(f"pruning {len(doomed)} of {len(entries)} group snapshots of {group} ({describe(policy)})"), markup=False
        )
        for e in doomed:
            console().print(f"  delete {shown(label(e))}", markup=False)
    return _run_plan(args, doomed, "delete")


def _show_prune(
    args: argparse.Namespace, group: str, policy: str, entries: list[dict[str, Any]], kept: dict[str, list[str]]
) -> int:
    rows = [
        {
            "group_snapshot": f"{e['group']}@{e['name']}",
            "txid": e["txid"],
            "time": e["time"],
            "verdict": "keep" if e["txid"] in kept else "delete",
            "why": kept.get(e["txid"], []) or ["kept by no rule"],
        }
        for e in entries
    ]
    if args.json:
        print_json({"group": group, "policy": policy, "dry_run": True, "group_snapshots": rows})
        return 0
    out = console()
    out.print(shown(f"{group}: {policy} (dry run: nothing is deleted)"), markup=False)
    for r in reversed(rows):
        taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["time"]))
        out.print(shown(f"  {r['verdict']:<6} {r['group_snapshot']:<40} {taken}  {', '.join(r['why'])}"), markup=False)
    doomed = sum(r["verdict"] == "delete" for r in rows)
    out.print(f"would delete {doomed} of {len(rows)}", markup=False)
    return 0


def add_arguments(subs: dict[str, argparse.ArgumentParser]) -> None:
    """The arguments of ``revert``, ``delete`` and ``prune`` (those of them in ``subs``)."""
    if "revert" in subs:
        subs["revert"].add_argument("ref", metavar="GROUP@NAME", help="the group snapshot to bring every member back to")
        keep = subs["revert"].add_mutually_exclusive_group()
        keep.add_argument(
            "--keep-current",
            action="store_true",
            help="keep what each member held before the revert (qcow2 internal: the safety snapshot; btrfs: the "
            "subvolume set aside) instead of removing it after the commit point",
        )
        keep.add_argument(
            "--discard-current",
            action="store_true",
            help="remove the abandoned branch of external qcow2 members after the commit point (kept and listed by default)",
        )
    if "delete" in subs:
        subs["delete"].add_argument("ref", nargs="+", metavar="GROUP@NAME", help="the group snapshots to delete, all or none")
    if "prune" in subs:
        prune = subs["prune"]
        prune.add_argument("group", nargs="?", help="the group to prune (default: the spec's, with --spec)")
        prune.add_argument("--spec", metavar="FILE", help="take the group and [retention] keep from this spec")
        prune.add_argument(
            "--keep", metavar="RULES", help="retention rules, replacing the spec's: last=3,hourly=24,daily=7,weekly=4,monthly=6"
        )
        prune.add_argument("--dry-run", action="store_true", help="list what would be deleted and why; delete nothing")
    for name in ("delete", "prune"):
        if name in subs:
            subs[name].add_argument(
                "--missing-ok",
                action="store_true",
                help="delete what is left of group snapshots whose members were removed by hand (otherwise refused)",
            )
    for name in ("revert", "delete", "prune"):
        if name not in subs:
            continue
        subs[name].add_argument(
            "--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to SECONDS for targets locked by another run"
        )
        subs[name].add_argument(
            "--allow-shared-folders",
            action="store_true",
            help="allow members in folders that other users can write (see docs/security.md)",
        )


EXAMPLES = {
    "revert": [
        "blktx revert web@nightly-20261126-0300      # every member back, all or none",
        "blktx revert --keep-current web@nightly-20261126-0300",
    ],
    "delete": ["blktx delete web@nightly-20261101-0300 web@nightly-20261102-0300"],
    "prune": [
        "blktx prune --spec /etc/blktx/web.toml --dry-run   # what would go, and why",
        "blktx prune web --keep last=3,daily=7,weekly=4",
    ],
}
