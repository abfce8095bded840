"""``blktx schema``: a JSON Schema of the spec format with every installed type's
parameters, for editors (Even Better TOML's ``#:schema`` directive) and CI checks.
It accepts exactly what ``blktx check`` accepts before running checks, except for
what a schema cannot see (paths outside the allowed roots)."""

from __future__ import annotations

from typing import Any

from blktx.context import spec_options
from blktx.params import Param
from blktx.plugins import Registry
from blktx.spec import VERSION

_KIND: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "path": {"type": "string", "minLength": 1},
    "address": {"type": "string", "pattern": "^(?!tcp:).+|^tcp:.+:[0-9]+$"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "list[str]": {"type": "array", "items": {"type": "string"}},
    "table[str]": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _param(p: Param) -> dict[str, Any]:
    out = dict(_KIND[p.kind])
    if p.choices is not None:
        out["enum"] = list(p.choices)
    if p.doc:
        out["description"] = p.doc
    if not p.required and p.default is not None:
        out["default"] = p.default
    return out


def schema(registry: Registry) -> dict[str, Any]:
    """The spec format as JSON Schema (2020-12). Actions are discriminated on
    ``type`` (an enum, then one ``if``/``then`` per type) rather than ``oneOf``, so
    that an editor names the real mistake: an unknown type, an unknown key, a
    value of the wrong kind, never "not valid under any of the schemas"."""
    branches = []
    for name, entry in sorted(registry.types.items()):
        cls = entry.cls
        props: dict[str, Any] = {"type": {"const": name}}
        props.update({p.name: _param(p) for p in cls.params})
        branches.append(
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {
                    "title": name,
                    "description": f"{cls.summary()} (plugin {entry.plugin})",
                    "properties": props,
                    "required": ["type", *[p.name for p in cls.params if p.required]],
                    "additionalProperties": False,
                },
            }
        )
    plugins = registry.plugin_names()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "blktx transaction spec, version 1",
        "type": "object",
        "required": ["version", "action"],
        "additionalProperties": False,
        "properties": {
            "version": {"const": VERSION, "description": "the spec format's version"},
            "description": {"type": "string"},
            "group": {"type": "string", "description": "the group its group snapshot belongs to (default: the file's name)"},
            "snapshot": {
                "type": "string",
                "description": "the group snapshot's name; templates {now:%Y%m%d}, {host}, {group}, {txid}",
            },
            "options": {
                "type": "object",
                "properties": {
                    **{name: opt.json_schema() for name, opt in spec_options().items()},
                    **{
                        plugin: {"type": "object", "description": f"settings of the {plugin} plugin"}
                        for plugin in plugins
                        if plugin not in spec_options()
                    },
                },
                "additionalProperties": False,
            },
            "action": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"enum": sorted(registry.types), "description": "the action type (`blktx types` lists them)"}
                    },
                    "allOf": branches,
                },
            },
        },
    }
