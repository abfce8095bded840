"""Loading plugins and recording the action types they register."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from importlib import import_module
from typing import NamedTuple

import pluggy

from blktx import hookspecs
from blktx.actiontype import ActionType
from blktx.errors import PluginProblem

ENTRY_POINT_GROUP = "blktx"
_NAME = re.compile(r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*$")


@dataclass(frozen=True)
class RegisteredType:
    cls: type[ActionType]
    instance: ActionType
    plugin: str


#: A built-in plugin registers only types whose name begins with its entry-point
#: name, or with the prefix this table gives it (``tests/test_plugins.py`` checks
#: both), so a registry can import it only when a type of it is asked for.
BUILTIN_PREFIXES = {"host": "hostfs"}
BUILTIN_MODULE = "blktx_plugins."


@dataclass
class Registry:
    """The plugin manager, the action types it registered and the problems it met.

    ``pending`` holds built-in plugins not imported yet (a lazy registry, see
    :func:`load`): :meth:`get` imports the one a type's name points at, and
    :attr:`types` imports them all before answering.
    """

    pm: pluggy.PluginManager
    loaded: dict[str, RegisteredType] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    pending: dict[str, EntryPoint] = field(default_factory=dict)
    #: The entry points registered so far (eagerly or lazily), for :meth:`_in_eager_order`.
    entry_points: set[str] = field(default_factory=set)

    @property
    def types(self) -> dict[str, RegisteredType]:
        """Every registered type (every pending plugin imported first)."""
        self.load_pending()
        return self.loaded

    def load_pending(self) -> None:
        if self.pending:
            for name in sorted(self.pending):
                _load_entry_point(self, self.pending.pop(name))
            self._in_eager_order()  # once for them all

    def _load_one(self, name: str) -> None:
        ep = self.pending.pop(name, None)
        if ep is not None:
            _load_entry_point(self, ep)
            self._in_eager_order()

    def _in_eager_order(self) -> None:
        """Re-register the plugins in the order an eager :func:`load` registers them (the
        entry points by name, then the others as they came), since pluggy calls the last
        registered first: a plugin imported when a spec names its type must not change
        the order the quiesce hooks run in (a host filesystem frozen before
        ``postgres.backup``'s checkpoint, say) with the order the spec lists its types."""
        current = [name for name, plugin in self.pm.list_name_plugin() if name and plugin is not None]
        wanted = sorted(n for n in current if n in self.entry_points) + [n for n in current if n not in self.entry_points]
        first = next((i for i, (a, b) in enumerate(zip(current, wanted, strict=True)) if a != b), None)
        if first is None:
            return
        plugins = {name: self.pm.unregister(name=name) for name in current[first:]}
        for name in wanted[first:]:
            self.pm.register(plugins[name], name=name)

    def plugin_names(self) -> list[str]:
        """The names of the plugins loaded or pending (not those that failed)."""
        return sorted({name for name, _ in self.pm.list_name_plugin() if name} | set(self.pending))

    def get(self, name: str) -> ActionType | None:
        entry = self.loaded.get(name)
        if entry is None and self.pending:
            prefix = name.split(".", 1)[0]
            self._load_one(BUILTIN_PREFIXES.get(prefix, prefix))
            entry = self.loaded.get(name)
        return entry.instance if entry else None

    def unknown(self, name: str, others: tuple[str, ...] = ()) -> str:
        """The hint for a type that is not registered: why its plugin did not load, or
        the closest name of its own plugin; a guess from another plugin (an offline
        image's type for a live VM's, say) is never offered without saying so."""
        import difflib

        prefix = name.split(".", 1)[0]
        plugin = BUILTIN_PREFIXES.get(prefix, prefix)  # host.* is plugin hostfs's
        failed = [p.message for p in self.problems if p.plugin == plugin]
        if failed:
            return f"plugin {plugin!r} did not load: {failed[0]}"
        same = [n for n in self.types if n.split(".", 1)[0] == prefix]
        match = difflib.get_close_matches(name, same or [*self.types, *others], n=1)
        if not match:
            return "`blktx types` lists the installed types"
        entry = self.loaded.get(match[0])
        if same or entry is None or "." not in match[0]:
            return f"did you mean {match[0]!r}?"
        return (
            f"did you mean {match[0]!r}? It is a type of plugin {entry.plugin!r}, not {plugin!r}: "
            "`blktx types` says what each does"
        )

    def register_types_of(self, plugin_name: str, plugin: object) -> None:
        impl = getattr(plugin, "blktx_register_action_types", None)
        if impl is None:
            return

        def register(cls: type[ActionType]) -> None:
            problems = declaration_problems(cls)
            name = getattr(cls, "name", "")
            if not problems and name in self.loaded:
                problems = [f"type {name!r} is already registered by plugin {self.loaded[name].plugin!r}"]
            if problems:
                self.problems.append(PluginProblem(plugin_name, f"{getattr(cls, '__name__', cls)!s}: " + "; ".join(problems)))
                return
            try:
                instance = cls()
            except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the others
                self.problems.append(PluginProblem(plugin_name, f"{cls.__name__}() failed: {exc}"))
                return
            self.loaded[name] = RegisteredType(cls, instance, plugin_name)

        try:
            impl(register=register)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the others
            self.problems.append(PluginProblem(plugin_name, f"blktx_register_action_types failed: {exc}"))


def declaration_problems(cls: object) -> list[str]:
    """What is wrong with an action type's declaration; empty when it is well formed."""
    if not (isinstance(cls, type) and issubclass(cls, ActionType)):
        return [f"{cls!r} is not a subclass of blktx.ActionType"]
    found = []
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        found.append(f"name {cls.name!r} is not of the form 'plugin.verb' in lowercase")
    seen = set()
    for p in cls.params:
        found.extend(p.problems())
        if p.name in seen:
            found.append(f"parameter {p.name!r} is declared twice")
        seen.add(p.name)
    found.extend(cls.lifecycle.problems())
    for method in ("target", "do", *(() if cls.finalize else ("cancel",))):
        if getattr(cls, method) is getattr(ActionType, method) and not (
            method != "target" and getattr(cls, method + "_many") is not getattr(ActionType, method + "_many")
        ):
            found.append(f"{method}() is not implemented")
    return found


class EntryPoint(NamedTuple):
    """One ``[blktx]`` line of an installed distribution's ``entry_points.txt``."""

    name: str
    value: str
    #: The ``*.dist-info`` (or ``*.egg-info``) folder it was read from.
    where: str

    def load(self) -> object:
        module, _, attr = self.value.partition(":")
        found: object = import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            found = getattr(found, part)
        return found

    @property
    def dist(self) -> str:
        """``name version`` from the distribution's ``METADATA`` (read only for messages)."""
        fields: dict[str, str] = {}
        for meta in ("METADATA", "PKG-INFO"):
            try:
                with open(os.path.join(self.where, meta), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if not line.strip():
                            break
                        key, _, value = line.partition(":")
                        fields.setdefault(key.strip().lower(), value.strip())
                break
            except OSError:
                continue
        stem = os.path.basename(self.where).rsplit(".", 1)[0]
        name, _, version = stem.partition("-")
        return f"{fields.get('name', name)} {fields.get('version', version or '?')}"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entry_points(group: str = "") -> list[EntryPoint]:
    """The entry points of ``group`` of every distribution on ``sys.path``.

    What ``importlib.metadata.entry_points(group=...)`` returns for distributions
    installed as folders (``*.dist-info``, ``*.egg-info``; editable installs
    included), a distribution found twice counted once (the first on ``sys.path``),
    without importing ``importlib.metadata`` and ``email`` (~18 ms of every start).
    Distributions inside zip files on ``sys.path`` are not seen.
    """
    group = group or ENTRY_POINT_GROUP
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for entry in sys.path:
        folder = entry or "."
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            dist = _normalized(name.rsplit(".", 1)[0].partition("-")[0])
            if dist in seen:
                continue
            seen.add(dist)
            where = os.path.join(folder, name)
            try:
                with open(os.path.join(where, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            found.extend(EntryPoint(k, v, where) for k, v in _section(text, group))
    return found


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """``name = value`` lines of ``[group]`` in an ``entry_points.txt`` (an INI file)."""
    lines: list[tuple[str, str]] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line:
            key, _, value = line.partition("=")
            lines.append((key.strip(), re.sub(r"\s*\[.*\]\s*$", "", value.strip())))
    return lines


def _allowed() -> set[str] | None:
    value = os.environ.get("BLKTX_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def load(extra: list[tuple[str, object]] | None = None, *, lazy: bool = False) -> Registry:
    """Load every plugin of the ``blktx`` entry-point group, then ``extra`` ones.

    ``lazy``: built-in plugins (``blktx_plugins.*``) are imported only when a type
    of theirs is asked for (:meth:`Registry.get`) or the whole list is
    (:attr:`Registry.types`); other distributions' plugins are always imported,
    since their hooks may act on any run.

    ``BLKTX_LOAD_PLUGINS`` (comma-separated entry-point names; empty for none)
    limits which entry points load. ``BLKTX_TRACE_HOOKS=1`` prints every hook call
    to stderr. A plugin that fails to import is recorded in ``problems``; the
    others still load.
    """
    pm = pluggy.PluginManager("blktx")
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    allowed = _allowed()
    by_name: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(ENTRY_POINT_GROUP):
        if allowed is None or ep.name in allowed:
            group = by_name.setdefault(ep.name, [])
            if not any(e.value == ep.value for e in group):  # one distribution seen twice on sys.path
                group.append(ep)
    for name in sorted(by_name):
        eps = by_name[name]
        if len(eps) > 1:
            # Loading either would silently drop the other's types: load neither, say who.
            who = ", ".join(f"{ep.dist} ({ep.value})" for ep in eps)
            registry.problems.append(
                PluginProblem(
                    name, f"entry point name {name!r} is claimed by {who}; none of them was loaded: rename one entry point"
                )
            )
            continue
        ep = eps[0]
        if lazy and ep.value.strip().startswith(BUILTIN_MODULE):
            registry.pending[ep.name] = ep
        else:
            _load_entry_point(registry, ep)
    for name, plugin in extra or []:
        _add(registry, name, plugin)
    if os.environ.get("BLKTX_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return registry


def _load_entry_point(registry: Registry, ep: EntryPoint) -> None:
    try:
        module = ep.load()
    except Exception as exc:  # noqa: BLE001 - reported; the other plugins still load
        registry.problems.append(PluginProblem(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}"))
        return
    registry.entry_points.add(ep.name)
    _add(registry, ep.name, module)


def _add(registry: Registry, name: str, plugin: object) -> None:
    try:
        registry.pm.register(plugin, name=name)
    except Exception as exc:  # noqa: BLE001 - a malformed hookimpl is reported with the plugin's name
        registry.problems.append(PluginProblem(name, f"could not be registered: {exc}"))
        return
    registry.register_types_of(name, plugin)


_cached: Registry | None = None


def default_registry(*, lazy: bool = False) -> Registry:
    """The registry of the installed plugins, loaded once per process; ``lazy``
    leaves the built-in plugins no type was asked of unimported (``check`` and
    ``run`` of a spec: only its types' plugins are imported)."""
    global _cached
    if _cached is None:
        _cached = load(lazy=True)
    if not lazy:
        _cached.load_pending()
    return _cached
