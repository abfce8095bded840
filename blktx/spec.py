"""Transaction specs: the TOML format (``version = 1``), and the same from Python.

Every problem of a spec is collected before anything is reported, each located by
file, line and column, action index and key, with a hint.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Any

import tomli

from blktx.actiontype import Action
from blktx.catalog import Naming, check_name, default_group, expand
from blktx.context import Options, spec_options
from blktx.errors import InvalidTransaction, Problem
from blktx.identity import untrusted_folders
from blktx.params import ParamError, did_you_mean, within_roots
from blktx.plugins import Registry

VERSION = 1
TOP_KEYS = ["version", "description", "group", "snapshot", "retention", "options", "action"]
OPTION_KEYS = spec_options()


@dataclass
class ActionSpec:
    """One ``[[action]]``: its type and its parameters, as written."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass
class Transaction:
    """A transaction before validation. Build one in Python or with :func:`load_spec`.

    Relative paths in parameters resolve against ``base_dir``.
    """

    actions: list[ActionSpec]
    options: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    base_dir: str = field(default_factory=os.getcwd)
    description: str = ""
    #: The group snapshot's group and name template (``blktx.catalog``); empty: defaults.
    group: str = ""
    snapshot: str = ""
    #: The parsed TOML document, when the transaction came from one.
    raw: dict[str, Any] | None = field(default=None, repr=False)
    _positions: dict[tuple[Any, ...], tuple[int, int]] = field(default_factory=dict, repr=False)
    #: The spec's text, scanned for positions only when a problem needs one.
    _text: str | None = field(default=None, repr=False)

    def where(self, *path: Any) -> tuple[int | None, int | None]:
        """The line and column of a key (``("action", 0, "image")``), as near as known."""
        if self._text is not None:  # first asked: scan now (a valid spec never needs it)
            self._positions, self._text = _positions(self._text), None
        while path:
            if path in self._positions:
                return self._positions[path]
            path = path[:-1]
        return None, None


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?")
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*=")


def _positions(text: str, only: str | None = None) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Line and column of every table header and top-level key of each table (with
    ``only``: of the headers of that array of tables alone, ``[[action]]``).

    tomli gives no positions for valid documents, so this scans the lines; it is
    only used to point at a problem, never to read values.
    """
    found: dict[tuple[Any, ...], tuple[int, int]] = {}
    table: tuple[Any, ...] = ()
    counts: dict[str, int] = {}
    depth = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0]
        if depth == 0:
            header = _HEADER.match(stripped)
            if header:
                name = header.group(2).strip().strip("\"'")
                if header.group(1) == "[[":
                    counts[name] = counts.get(name, -1) + 1
                    table = (name, counts[name])
                else:
                    table = tuple(name.split("."))
                if only is None or table[0] == only:
                    found.setdefault(table, (lineno, header.start(1) + 1))
                continue
            key = _KEY.match(stripped) if only is None else None
            if key:
                found.setdefault((*table, key.group(2).strip("\"'")), (lineno, key.start(2) + 1))
        depth += stripped.count("[") - stripped.count("]") if "=" in stripped or depth else 0
        depth = max(depth, 0)
    return found


#: A spec larger than this is refused before it is parsed.
MAX_SPEC_BYTES = 16 << 20
#: Tables and arrays nested deeper than this are refused (a spec needs three).
MAX_DEPTH = 32


def parse_spec(text: str, file: str | None = None, base_dir: str | None = None) -> Transaction:
    """Parse a TOML spec. Raises :class:`InvalidTransaction` on a TOML syntax error,
    on nesting deeper than :data:`MAX_DEPTH`, and on a NUL character anywhere."""
    hint = "see specs/README.md for the format"
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise InvalidTransaction(
            [
                Problem(
                    "the spec contains a NUL character",
                    file=file,
                    line=line,
                    hint="a spec is UTF-8 text; NUL is never valid in a path or a name",
                )
            ]
        )
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        raise InvalidTransaction([Problem(f"arrays or tables nested {depth} deep (at most {MAX_DEPTH})", file=file, hint=hint)])
    try:
        doc = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        msg = exc.msg if hasattr(exc, "msg") else str(exc)
        raise InvalidTransaction(
            [
                Problem(
                    f"not valid TOML: {msg}",
                    file=file,
                    line=getattr(exc, "lineno", None),
                    column=getattr(exc, "colno", None),
                    hint=hint,
                )
            ]
        ) from None
    except RecursionError:
        raise InvalidTransaction([Problem("nested too deeply to read", file=file, hint=hint)]) from None
    bad = _nul_in(doc)
    if bad is not None:
        raise InvalidTransaction(
            [
                Problem(
                    "a value contains a NUL character (written as an escape)",
                    file=file,
                    key=bad,
                    hint="NUL is never valid in a path or a name",
                )
            ]
        )
    # Only the [[action]] lines now (every action carries its line); every other
    # position when a problem asks for it (at 100,000 actions the full map is ~70 MB).
    tx = from_document(doc, file=file, base_dir=base_dir, positions=_positions(text, only="action"))
    tx._text = text
    return tx


def _max_depth(text: str) -> int:
    """How deep brackets and braces nest outside strings and comments (a bound
    checked before tomli recurses into them)."""
    deepest = depth = 0
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "\n" and not quote:
            pass
        i += 1
    return deepest


def _nul_in(value: Any, path: str = "") -> str | None:
    """The dotted key of the first string (or key) holding a NUL, or None."""
    if isinstance(value, str):
        return (path or "(value)") if "\0" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}" if path else str(k)
            if "\0" in str(k):
                return where
            found = _nul_in(v, where)
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_in(v, f"{path}[{i}]")
            if found:
                return found
    return None


def from_document(
    doc: dict[str, Any],
    file: str | None = None,
    base_dir: str | None = None,
    positions: dict[tuple[Any, ...], tuple[int, int]] | None = None,
) -> Transaction:
    """A transaction from an already parsed document (TOML, JSON, or built in Python)."""
    positions = positions or {}
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(file)) if file else os.getcwd()
    tx = Transaction(actions=[], file=file, base_dir=base_dir)
    tx._positions = positions
    tx.options = doc.get("options", {}) if isinstance(doc.get("options", {}), dict) else {"__bad__": doc["options"]}
    tx.description = str(doc.get("description", ""))
    tx.group = doc["group"] if isinstance(doc.get("group"), str) else ""
    tx.snapshot = doc["snapshot"] if isinstance(doc.get("snapshot"), str) else ""
    raw_actions = doc.get("action", [])
    tx.raw = doc
    if isinstance(raw_actions, list):
        for i, raw in enumerate(raw_actions):
            if isinstance(raw, dict):
                params = {k: v for k, v in raw.items() if k != "type"}
                line = positions.get(("action", i), (None, 0))[0]
                tx.actions.append(ActionSpec(str(raw.get("type", "")), params, line))
            else:
                tx.actions.append(ActionSpec("", {"__bad__": raw}))
    return tx


#: The caller's own descriptors (``-``, ``/dev/stdin``, ``<(generate)``): read whatever
#: they are, a pipe included; relative paths resolve against the current folder.
_DESCRIPTOR = re.compile(r"/dev/stdin|/dev/fd/[0-9]+|/proc/self/fd/[0-9]+")


def load_spec(path: str) -> Transaction:
    """Read and parse a spec file. Raises :class:`InvalidTransaction` naming the file."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
        return parse_spec(_decode(data, "<stdin>"), file="<stdin>", base_dir=os.getcwd())
    descriptor = _DESCRIPTOR.fullmatch(os.path.abspath(path)) is not None
    try:
        # O_NONBLOCK: a FIFO in place of the spec must not hang the run
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if descriptor else os.O_NONBLOCK))
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise InvalidTransaction([Problem(f"cannot read the spec: {why}", file=path, hint="check the path")]) from None
    with os.fdopen(fd, "rb") as fh:
        if not descriptor and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidTransaction([Problem("the spec is not a regular file", file=path, hint="give the path of a TOML file")])
        data = fh.read(MAX_SPEC_BYTES + 1)
    return parse_spec(_decode(data, path), file=path, base_dir=os.getcwd() if descriptor else None)


def _decode(data: bytes, path: str) -> str:
    """The spec's text: at most :data:`MAX_SPEC_BYTES` of UTF-8 (a BOM is dropped)."""
    if len(data) > MAX_SPEC_BYTES:
        raise InvalidTransaction(
            [
                Problem(
                    f"the spec is larger than {MAX_SPEC_BYTES >> 20} MiB",
                    file=path,
                    hint="a spec lists actions; split a huge one into several",
                )
            ]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidTransaction(
            [
                Problem(
                    f"the spec is not UTF-8 text (byte 0x{data[exc.start]:02x})",
                    file=path,
                    line=line,
                    column=column,
                    hint="save it as UTF-8 (TOML files are UTF-8 by definition)",
                )
            ]
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def confinement(
    kind: str, value: Any, options: Options, seen: dict[tuple[str, bool], str | None] | None = None
) -> tuple[str, str] | None:
    """Why a path or address breaks a rule of docs/security.md (message, hint), or None.
    ``seen``: folders already judged in this bind (see :func:`~blktx.identity.untrusted_folders`)."""
    if kind == "address" and isinstance(value, str) and value.startswith("tcp:"):
        if not options.allow_tcp:
            return (
                f"{value}: a TCP address is refused [rule tcp-opt-in]: anyone who can reach the port can answer as the VM",
                "pass --allow-tcp if that port is yours",
            )
        return None
    if kind not in ("path", "address") or not isinstance(value, str):
        return None
    roots = options.roots + (options.vm_roots if kind == "address" else [])
    if not within_roots(value, roots):
        what = "socket" if kind == "address" else "path"
        return (
            f"{what} {value} is outside the allowed roots ({', '.join(roots)}) [rule confined-paths]",
            "move it under the spec's directory or widen with --root DIR" + (" or --vm-root DIR" if kind == "address" else ""),
        )
    if not options.shared_folders:
        why = untrusted_folders(value, seen)
        if why:
            return (
                f"{value}: {why} [rule trusted-folders]: another user could swap what blktx acts on",
                "keep images and sockets in folders only root (or you) can write, or pass "
                "--allow-shared-folders if you accept that",
            )
    return None


def _check_retention(value: Any, problem: Any) -> None:
    """``[retention] keep = {...}`` (read by ``blktx prune --spec``), checked with the spec."""
    from blktx.retention import parse_policy

    if not isinstance(value, dict):
        problem("'retention' must be a table", "retention", key="retention", hint="write [retention] keep = {daily = 7}")
        return
    for key in value:
        if key != "keep":
            problem(f"unknown key {key!r} in [retention]", "retention", key, key=key, hint="the only key is keep = {...}")
    try:
        parse_policy(value.get("keep", {}))
    except ValueError as exc:
        problem(
            f"[retention] keep: {exc}", "retention", "keep", key="keep", hint="e.g. keep = { last = 3, daily = 7, weekly = 4 }"
        )


def bind(
    tx: Transaction,
    registry: Registry,
    *,
    allow_exec: bool = False,
    roots: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    vm_roots: list[str] | None = None,
    allow_tcp: bool = False,
    shared_folders: bool = False,
    txid: str | None = None,
) -> tuple[list[Action], Options]:
    """Validate ``tx`` against the registered types; return its actions and options.

    ``roots`` are the directories paths may lie under (default: the spec's
    directory). Raises :class:`InvalidTransaction` listing every problem at once.
    Touches nothing.
    """
    problems: list[Problem] = []

    def problem(
        message: str,
        *path: Any,
        action: int | None = None,
        key: str | None = None,
        hint: str | None = None,
        target: str | None = None,
    ) -> None:
        line, col = tx.where(*path)
        problems.append(Problem(message, tx.file, line, col, action, key, target, hint))

    raw = tx.raw
    if raw is not None:
        if "version" not in raw:
            problem("the spec has no version", hint=f"add 'version = {VERSION}' at the top")
        elif isinstance(raw["version"], bool) or raw["version"] != VERSION:
            problem(
                f"unsupported spec version {raw['version']!r}",
                "version",
                key="version",
                hint=f"this blktx reads version {VERSION}",
            )
        for key in ("description", "group", "snapshot"):
            if not isinstance(raw.get(key, ""), str):
                problem(f"'{key}' must be a string", key, key=key)
        for key in raw:
            if key not in TOP_KEYS:
                problem(
                    f"unknown top-level key {key!r}",
                    key,
                    key=key,
                    hint=did_you_mean(key, TOP_KEYS) or f"known keys: {', '.join(TOP_KEYS)}",
                )
        if "retention" in raw:
            _check_retention(raw["retention"], problem)
        if "action" in raw and not isinstance(raw["action"], list):
            problem("'action' must be an array of tables", "action", key="action", hint="write each action as [[action]]")

    naming = None
    if txid is not None:
        group = tx.group or default_group(tx.file)
        why = check_name(group, "group")
        if why:
            problem(why, "group", key="group", hint='name the group in the spec: group = "web"')
        try:
            naming = Naming(group, expand(tx.snapshot, group=group, txid=txid) if tx.snapshot else txid)
        except ValueError as exc:
            problem(
                f"snapshot name template {tx.snapshot!r}: {exc}",
                "snapshot",
                key="snapshot",
                hint='e.g. snapshot = "nightly-{now:%Y%m%d-%H%M}"',
            )
    if not roots and os.path.realpath(tx.base_dir) == "/":
        problem(
            "the spec's paths would be confined to / (its folder, or the current folder for a spec on "
            "standard input): that confines nothing [rule confined-paths]",
            hint="give --root DIR (the folders its paths may be in), or run it from a folder of its own",
        )
    options = Options(
        roots=list(roots) if roots else [tx.base_dir],
        allow_exec=allow_exec,
        vm_roots=list(vm_roots or []),
        allow_tcp=allow_tcp,
        shared_folders=shared_folders,
    )
    given = dict(tx.options)
    given.update(overrides or {})
    for key, value in given.items():
        if key == "__bad__":
            problem("'options' must be a table", "options", key="options", hint="write [options]")
            continue
        kind = OPTION_KEYS.get(key)
        if kind is None:
            plugins = registry.plugin_names()
            if isinstance(value, dict) and key in plugins:
                options.extra[key] = value
                continue
            if isinstance(value, dict):  # a typo would otherwise be ignored in silence
                problem(
                    f"no installed plugin {key!r} for the table [options.{key}]",
                    "options",
                    key,
                    key=key,
                    hint=did_you_mean(key, plugins) or f"installed plugins: {', '.join(plugins)}",
                )
                continue
            problem(
                f"unknown option {key!r}",
                "options",
                key,
                key=key,
                hint=did_you_mean(key, list(OPTION_KEYS)) or f"known options: {', '.join(OPTION_KEYS)}",
            )
            continue
        if kind.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON Schema's integers include 2.0; so do ours
        why = kind.problem(value)
        if why is not None:
            hint = None
            if kind.choices and isinstance(value, str):
                hint = did_you_mean(value, list(kind.choices)) or f"one of {', '.join(kind.choices)}"
            problem(f"option {key!r} {why}", "options", key, key=key, hint=hint)
            continue
        setattr(options, key, kind.parse(value))

    if not tx.actions and (raw is None or "action" not in raw or isinstance(raw.get("action"), list)):
        problem("the transaction has no actions", hint="add at least one [[action]] table")

    actions: list[Action] = []
    folders: dict[tuple[str, bool], str | None] = {}  # each folder judged once per bind
    for i, spec in enumerate(tx.actions):
        if "__bad__" in spec.params:
            problem("an action must be a table", "action", i, action=i)
            continue
        if not spec.type:
            problem(
                "the action has no type", "action", i, action=i, key="type", hint='add type = "..."; `blktx types` lists them'
            )
            continue
        atype = registry.get(spec.type)
        if atype is None:
            problem(
                f"unknown action type {spec.type!r}",
                "action",
                i,
                "type",
                action=i,
                key="type",
                hint=registry.unknown(spec.type),
            )
            continue
        declared = {p.name: p for p in atype.params}
        values: dict[str, Any] = {}
        bad = False
        for key, value in spec.params.items():
            param = declared.get(key)
            if param is None:
                bad = True
                problem(
                    f"{spec.type} has no parameter {key!r}",
                    "action",
                    i,
                    key,
                    action=i,
                    key=key,
                    hint=did_you_mean(key, list(declared)) or f"its parameters: {', '.join(declared) or 'none'}",
                )
                continue
            try:
                values[key] = param.coerce(value, tx.base_dir)
            except ParamError as exc:
                bad = True
                problem(str(exc), "action", i, key, action=i, key=key, hint=exc.hint)
                continue
            refusal = confinement(param.kind, values[key], options, folders)
            if refusal is not None:
                bad = True
                problem(refusal[0], "action", i, key, action=i, key=key, hint=refusal[1])
        for name, param in declared.items():
            if name in values or name in spec.params:
                continue
            if name == "name" and tx.snapshot and not atype.finalize and param.kind == "str":
                # the group snapshot's name, for every type that takes one (its template's
                # own problem is reported once, at the snapshot key)
                values[name] = naming.name if naming is not None else ""
                continue
            if param.required:
                bad = True
                problem(
                    f"{spec.type} needs parameter {name!r} ({param.describe()})",
                    "action",
                    i,
                    action=i,
                    key=name,
                    hint=param.doc or None,
                )
            else:
                default = param.default
                values[name] = param.coerce(default, tx.base_dir) if param.kind == "path" and default else default
        if bad:
            continue
        action = Action(i, atype, values, "", spec.line)
        try:
            action.target = atype.target(action)
        except Exception as exc:  # noqa: BLE001 - a type's own validation message
            problem(str(exc), "action", i, action=i)
            continue
        actions.append(action)
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise InvalidTransaction(problems)
    if naming is not None:
        options.group, options.snapshot = naming.group, naming.name
        options.group_defaulted = not tx.group
    return actions, options
