"""Exceptions and the user-facing problem records they carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Exit statuses of the CLI, as documented in the README and ``blktx --help``.
EXIT_COMMITTED = 0
EXIT_ROLLED_BACK = 1
EXIT_INVALID = 2
EXIT_NEEDS_RECOVERY = 3


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec or refused by a check, located as precisely as known."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    action: int | None = None
    key: str | None = None
    target: str | None = None
    hint: str | None = None

    def location(self) -> str:
        where = self.file or "<transaction>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return where

    def __str__(self) -> str:
        parts = [self.location() + ":"]
        if self.action is not None:
            parts.append(f"action #{self.action}")
        if self.key:
            parts.append(f"'{self.key}':")
        if self.target:
            parts.append(f"[{self.target}]")
        text = " ".join(parts) + " " + self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class BlktxError(Exception):
    """Base of every error blktx raises on purpose."""


class Refused(BlktxError):
    """Raised by ``ActionType.check`` to refuse an action; nothing has been touched.

    ``missing``: the path that does not exist, when that is the reason; the report then
    says where the spec's relative paths resolve (its folder, not the current one)."""

    def __init__(self, reason: str, hint: str | None = None, *, missing: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.missing = missing


class ActionFailed(BlktxError):
    """A backend step failed; ``message`` is the backend's own words."""


class ActionFailures(BlktxError):
    """Raised by a batched step to say exactly which actions of the batch failed.

    ``failures`` maps the action's index to its exception; ``not_started`` lists the
    actions the batch gave up before touching. Every other action of the batch
    succeeded.
    """

    def __init__(self, failures: dict[int, BaseException], not_started: list[int] | None = None) -> None:
        super().__init__("; ".join(f"action #{i}: {e}" for i, e in failures.items()))
        self.failures = failures
        self.not_started = not_started or []


class InvalidTransaction(BlktxError):
    """The spec or a check refused the transaction; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class PluginProblem(BlktxError):
    """A plugin failed to load or registered something malformed."""

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r}: {message}")
        self.plugin = plugin
        self.message = message
