"""The check phase: every action's check and every conflict between actions, all
refusals at once. Touches nothing."""

from __future__ import annotations

import os
from collections.abc import Sequence

from blktx.actiontype import Action, ActionType
from blktx.context import RunContext
from blktx.errors import ActionFailures, Problem, Refused
from blktx.identity import lock_keys


def check_actions(actions: list[Action], ctx: RunContext, file: str | None) -> list[Problem]:
    """Every check and every conflict; all refusals at once. Touches nothing."""
    problems: list[Problem] = []

    def refuse(a: Action, exc: BaseException) -> None:
        hint = exc.hint if isinstance(exc, Refused) else None
        missing = exc.missing if isinstance(exc, Refused) else None
        if missing and file and ctx.base_dir != os.getcwd() and missing.startswith(ctx.base_dir.rstrip("/") + "/"):
            where = f"relative paths in {file} resolve against its folder {ctx.base_dir}, not the current folder"
            hint = f"{hint}; {where}" if hint else where
        problems.append(Problem(str(exc) or type(exc).__name__, file, a.line, None, a.index, None, a.target, hint))

    by_index = {a.index: a for a in actions}
    for atype, group in _by_type(actions):
        if atype.batched:
            try:
                atype.check_many(group, ctx)
            except ActionFailures as exc:
                for index, err in exc.failures.items():
                    refuse(by_index[index], err)
                for index in exc.not_started:  # a check that did not run is no pass
                    refuse(by_index[index], RuntimeError(f"not checked: {atype.name} gave up on its batch"))
            except Exception as exc:  # noqa: BLE001 - a failed batch check refuses the whole batch
                for a in group:
                    refuse(a, exc)
        else:
            for a in group:
                try:
                    atype.check(a, ctx)
                except Exception as exc:  # noqa: BLE001 - every check error is a refusal
                    refuse(a, exc)
    problems += conflicts(actions, file)
    problems.sort(key=lambda p: p.action if p.action is not None else -1)
    return problems


def conflicts(actions: list[Action], file: str | None) -> list[Problem]:
    """Two actions on one target (by identity, not spelling) that their types cannot share."""
    problems: list[Problem] = []
    first: dict[str, Action] = {}
    made: dict[str, Action] = {}
    for a in actions:
        claims = a.claims()
        for path in claims[1:]:  # two actions creating one file never both succeed
            for key in lock_keys(path):
                other = made.setdefault(key, a)
                if other is not a:
                    problems.append(
                        Problem(
                            f"creates {path}, as action #{other.index} ({other.type.name}) does",
                            file,
                            a.line,
                            None,
                            a.index,
                            None,
                            a.target,
                            "give each action its own file",
                        )
                    )
                    break
        keys = [a.target] if not a.target.startswith("/") else lock_keys(a.target)
        for key in keys:
            other = first.setdefault(key, a)
            if other is a or (a.type.shares_target and other.type.shares_target):
                continue
            problems.append(
                Problem(
                    f"conflicts with action #{other.index} ({other.type.name}) on the same target",
                    file,
                    a.line,
                    None,
                    a.index,
                    None,
                    a.target,
                    "a target can be changed by several actions only when every one of their types allows it; "
                    "split the transaction",
                )
            )
            break
    return problems


def _by_type(actions: Sequence[Action]) -> list[tuple[ActionType, list[Action]]]:
    groups: dict[int, tuple[ActionType, list[Action]]] = {}
    for a in actions:
        groups.setdefault(id(a.type), (a.type, []))[1].append(a)
    return list(groups.values())
