"""Parameters an action type declares, and how spec values are checked against them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

KINDS = ("str", "int", "float", "bool", "path", "address", "list[str]", "table[str]")

_NO_DEFAULT: Any = object()


class ParamError(ValueError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Param:
    """One parameter of an action type.

    :param name: the key in a spec's ``[[action]]`` table (lowercase, ``-`` or ``_``).
    :param kind: one of ``str``, ``int``, ``float``, ``bool``, ``path`` (resolved
        against the spec's directory and confined to the allowed roots),
        ``address`` (a unix socket path, resolved like a path and confined to
        the roots or ``--vm-root`` folders, or ``tcp:HOST:PORT``, only with
        ``--allow-tcp``), ``list[str]`` and ``table[str]``
        (a table of strings).
    :param required: whether the spec must give it.
    :param default: the value when it is not given (ignored when required).
    :param doc: one line for ``blktx types`` and the docs.
    :param choices: the allowed values of a ``str`` parameter.
    :param creates: for a ``path``: the action creates it (an overlay, a
        snapshot's destination). Such a path is locked like a target, and two
        actions of one transaction creating one path are refused at check.
    """

    name: str
    kind: str = "str"
    required: bool = False
    default: Any = None
    doc: str = ""
    choices: tuple[str, ...] | None = None
    creates: bool = False

    def problems(self) -> list[str]:
        found = []
        if not self.name.replace("-", "_").isidentifier() or self.name != self.name.lower():
            found.append(f"parameter name {self.name!r} is not a lowercase identifier")
        if self.name == "type":
            found.append(f"parameter name {self.name!r} is reserved")
        if self.kind not in KINDS:
            found.append(f"parameter {self.name!r} has unknown kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.choices is not None and self.kind != "str":
            found.append(f"parameter {self.name!r}: choices need kind 'str'")
        if self.creates and self.kind != "path":
            found.append(f"parameter {self.name!r}: creates needs kind 'path'")
        return found

    def coerce(self, value: Any, base_dir: str) -> Any:
        """Check one spec value; return it normalised (paths made absolute)."""
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"expected true or false, got {_show(value)}")
        elif kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON Schema's integers include 2.0; so do ours
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(f"expected an integer, got {_show(value)}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(f"expected a number, got {_show(value)}")
            value = float(value)
        elif kind in ("str", "path", "address"):
            if not isinstance(value, str):
                raise ParamError(f"expected a string, got {_show(value)}", hint='quote it: "..."')
            if kind == "address" and value.startswith("tcp:"):
                host, _, port = value[4:].rpartition(":")
                if not host or not port.isdigit():
                    raise ParamError(f"expected tcp:HOST:PORT, got {value!r}", hint='e.g. "tcp:127.0.0.1:4444"')
            elif kind in ("path", "address"):
                if not value:
                    raise ParamError(f"expected a {'path' if kind == 'path' else 'socket path'}, got an empty string")
                value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
            elif self.choices is not None and value not in self.choices:
                raise ParamError(
                    f"{value!r} is not one of {', '.join(map(repr, self.choices))}",
                    hint=_closest(value, self.choices),
                )
        elif kind == "list[str]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ParamError(f"expected a list of strings, got {_show(value)}", hint='write ["a", "b"]')
        elif kind == "table[str]":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ParamError(f"expected a table of strings, got {_show(value)}", hint='write { KEY = "value" }')
        return value

    def describe(self) -> str:
        text = self.kind
        if self.choices:
            text += " (" + "|".join(self.choices) + ")"
        if self.required:
            text += ", required"
        elif self.default is not None:
            text += f", default {self.default!r}"
        return text

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "required": self.required, "doc": self.doc}
        if not self.required:
            out["default"] = self.default
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _closest(word: str, options: tuple[str, ...] | list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, list(options), n=1)
    return f"did you mean {match[0]!r}?" if match else None


def did_you_mean(word: str, options: list[str]) -> str | None:
    """A "did you mean" hint for an unknown ``word``, or None when nothing is close."""
    return _closest(word, options)


def within_roots(path: str, roots: list[str]) -> bool:
    """Whether ``path``, with every symlink resolved, lies under one of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False
