"""``sim``: a simulated block layer kept in a JSON file, for tests, drills and benchmarks.

A world file holds devices, each with internal snapshots (id -> name), a chain of
layers, the active layer, and optionally the device's data and what each snapshot
saved of it (``sim.revert`` brings it back; ``"break": "revert"`` makes a revert of the
device fail after it changed the data)::

    {"devices": {"vda": {"snapshots": {"1": "monday"}, "layers": ["vda.base"],
                         "active": "vda.base", "data": "tue", "saved": {"1": "mon"}}}}

Every action can be told to fail at a phase (``fail = "do"``) or to fail its cancel
(``fail_cancel = true``), so that every outcome of the executor can be produced on
purpose and inspected between commands.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from blktx import Action, ActionFailed, ActionType, Leftover, Param, Refused, Register, RunContext, hookimpl

PHASES = ("", "check", "do", "invalidate")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def make_world(path: str, devices: list[str] | dict[str, Any]) -> None:
    """Write a world file with fresh devices (a list of names) or the given dict."""
    if isinstance(devices, list):
        devices = {d: {"snapshots": {}, "layers": [f"{d}.base"], "active": f"{d}.base"} for d in devices}
    _write(path, {"devices": devices})


def read_world(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _write(path: str, world: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(world, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextmanager
def _world(path: str, write: bool = True) -> Iterator[dict[str, Any]]:
    with _locks_guard:
        lock = _locks.setdefault(path, threading.Lock())
    # Runs on different devices of one world may overlap: the file lock keeps each
    # read-modify-write of the world whole across processes, the thread lock within one.
    with lock, open(f"{path}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            world = read_world(path)
        except FileNotFoundError:
            raise ActionFailed(f"sim world {path} does not exist") from None
        yield world
        if write:
            _write(path, world)


_COMMON = (
    Param("world", "path", default="sim-world.json", doc="the world file"),
    Param("device", "str", required=True, doc="the device in the world"),
    Param("fail", "str", default="", choices=PHASES, doc="fail on purpose in this phase"),
    Param("fail_cancel", "bool", default=False, doc="make every cancel of this action fail"),
)


class _SimType(ActionType):
    def target(self, action: Action) -> str:
        return f"sim:{action.params['world']}#{action.params['device']}"

    def _device(self, world: dict[str, Any], action: Action) -> dict[str, Any]:
        dev = world["devices"].get(action.params["device"])
        if dev is None:
            raise Refused(
                f"no device {action.params['device']!r} in {action.params['world']}",
                hint=f"devices: {', '.join(sorted(world['devices'])) or 'none'}",
            )
        return dev  # type: ignore[no-any-return]

    def _maybe_fail(self, action: Action, phase: str) -> None:
        if action.params["fail"] == phase:
            cls = Refused if phase == "check" else ActionFailed
            raise cls(f"injected failure in {phase}")

    def check(self, action: Action, ctx: RunContext) -> None:
        self._maybe_fail(action, "check")
        with _world(action.params["world"], write=False) as world:
            self._check(action, self._device(world, action))

    def _check(self, action: Action, dev: dict[str, Any]) -> None:
        return None

    def _cancel_guard(self, action: Action) -> None:
        if action.params["fail_cancel"]:
            raise ActionFailed("injected failure in cancel")


class Snapshot(_SimType):
    """Create an internal snapshot of a simulated device."""

    name = "sim.snapshot"
    shares_target = True
    revert_type = "sim.revert"
    delete_type = "sim.delete"
    params = (*_COMMON, Param("name", "str", required=True, doc="the snapshot's name"))

    def _check(self, action: Action, dev: dict[str, Any]) -> None:
        action.undo["before"] = sorted(int(i) for i in dev["snapshots"])

    def do(self, action: Action, ctx: RunContext) -> None:
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            new_id = max([0, *map(int, dev["snapshots"]), *action.undo.get("before", [])]) + 1
            # The id is durable before the snapshot exists: cancel removes that id only,
            # never another snapshot of the same name.
            action.undo["id"] = new_id
            ctx.remember([action])
            dev["snapshots"][str(new_id)] = action.params["name"]
            if "data" in dev:  # a device with data: the snapshot keeps what it held
                dev.setdefault("saved", {})[str(new_id)] = dev["data"]
        self._maybe_fail(action, "do")

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        self._maybe_fail(action, "invalidate")

    def _ours(self, action: Action, dev: dict[str, Any]) -> list[str]:
        made = action.undo.get("id")
        before = {str(i) for i in action.undo.get("before", [])}
        return [
            sid
            for sid, name in sorted(dev["snapshots"].items())
            if made is not None and sid == str(made) and sid not in before and name == action.params["name"]
        ]

    def cancel(self, action: Action, ctx: RunContext) -> None:
        self._cancel_guard(action)
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            for sid in self._ours(action, dev):
                del dev["snapshots"][sid]
                dev.get("saved", {}).pop(sid, None)

    def member_exists(self, action: Action) -> bool | None:
        with _world(action.params["world"], write=False) as world:
            return bool(self._ours(action, self._device(world, action)))

    def revert_params(self, action: Action) -> dict[str, Any]:
        return {
            "world": action.params["world"],
            "device": action.params["device"],
            "id": action.undo["id"],
            "name": action.params["name"],
        }

    def delete_params(self, action: Action) -> dict[str, Any]:
        return self.revert_params(action)

    def leftovers(self, action: Action) -> list[Leftover]:
        with _world(action.params["world"], write=False) as world:
            dev = self._device(world, action)
            return [Leftover(action.target, f"snapshot {dev['snapshots'][sid]!r} (id {sid})") for sid in self._ours(action, dev)]


class Overlay(_SimType):
    """Add an overlay layer on top of a simulated device and make it active."""

    name = "sim.overlay"
    params = (*_COMMON, Param("layer", "str", required=True, doc="the new layer's name"))

    def _check(self, action: Action, dev: dict[str, Any]) -> None:
        if action.params["layer"] in dev["layers"]:
            raise Refused(f"layer {action.params['layer']!r} already exists", hint="choose another name")
        action.undo["old_active"] = dev["active"]

    def do(self, action: Action, ctx: RunContext) -> None:
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            if action.params["layer"] in dev["layers"]:
                raise ActionFailed(f"layer {action.params['layer']!r} appeared after the check; it was left alone")
            # Ours from here on, durably, before it exists: cancel removes only a layer it made.
            action.undo["made"] = True
            ctx.remember([action])
            dev["layers"].append(action.params["layer"])
        self._maybe_fail(action, "do")

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        with _world(action.params["world"]) as world:
            self._device(world, action)["active"] = action.params["layer"]
        self._maybe_fail(action, "invalidate")

    def cancel(self, action: Action, ctx: RunContext) -> None:
        self._cancel_guard(action)
        layer = action.params["layer"]
        if not action.undo.get("made"):
            return  # do never made it: a layer of that name is somebody else's
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            if dev["active"] == layer:
                dev["active"] = action.undo["old_active"]
            if layer in dev["layers"]:
                dev["layers"].remove(layer)

    def leftovers(self, action: Action) -> list[Leftover]:
        layer = action.params["layer"]
        if not action.undo.get("made"):
            return []
        with _world(action.params["world"], write=False) as world:
            dev = self._device(world, action)
            found = []
            if layer in dev["layers"]:
                found.append(Leftover(action.target, f"layer {layer!r}"))
            if dev["active"] == layer:
                found.append(Leftover(action.target, f"active layer switched to {layer!r}"))
            return found


class Delete(_SimType):
    """Delete an internal snapshot of a simulated device (finalize: runs after commit)."""

    name = "sim.delete"
    finalize = True
    shares_target = True
    params = (
        *_COMMON[:2],
        Param("fail", "str", default="", choices=("", "check", "finalize"), doc="fail on purpose"),
        Param("fail_times", "int", default=-1, doc="how many finalize attempts fail (-1: all)"),
        Param("name", "str", required=True, doc="the snapshot's name"),
        Param("id", "int", default=0, doc="the snapshot's id (0: the oldest of the name)"),
    )

    def check(self, action: Action, ctx: RunContext) -> None:
        if action.params["fail"] == "check":
            raise Refused("injected failure in check")
        with _world(action.params["world"], write=False) as world:
            dev = self._device(world, action)
            ids = sorted(
                int(i) for i, n in dev["snapshots"].items() if n == action.params["name"] and action.params["id"] in (0, int(i))
            )
            if not ids:
                which = f" (id {action.params['id']})" if action.params["id"] else ""
                raise Refused(f"device {action.params['device']!r} has no snapshot {action.params['name']!r}{which}")
            claimed: dict[tuple[str, str, int], int] = ctx.resource("sim.delete.claimed", dict)
            key = (action.params["world"], action.params["device"], ids[0])
            if key in claimed:
                raise Refused(
                    f"conflicts with action #{claimed[key]}: both delete snapshot {action.params['name']!r} (id {ids[0]})"
                )
            claimed[key] = action.index
            action.undo["id"] = ids[0]

    def do(self, action: Action, ctx: RunContext) -> None:
        if action.params["fail"] == "finalize":
            failed = action.undo.get("failed", 0)
            if action.params["fail_times"] < 0 or failed < action.params["fail_times"]:
                action.undo["failed"] = failed + 1
                raise ActionFailed("injected failure in finalize")
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            dev["snapshots"].pop(str(action.undo["id"]), None)
            dev.get("saved", {}).pop(str(action.undo["id"]), None)


class Revert(_SimType):
    """Bring a simulated device's data back to an internal snapshot (cancel restores it)."""

    name = "sim.revert"
    params = (
        *_COMMON,
        Param("id", "int", required=True, doc="the snapshot's id"),
        Param("name", "str", required=True, doc="the snapshot's name (must match the id's)"),
    )

    def catalog_member(self, action: Action) -> dict[str, Any] | None:
        return None  # keeps nothing: the data it replaced is gone after the commit point

    def _check(self, action: Action, dev: dict[str, Any]) -> None:
        sid = str(action.params["id"])
        if dev["snapshots"].get(sid) != action.params["name"]:
            raise Refused(f"device {action.params['device']!r} has no snapshot {action.params['name']!r} with id {sid}")

    def do(self, action: Action, ctx: RunContext) -> None:
        with _world(action.params["world"]) as world:
            dev = self._device(world, action)
            self._check(action, dev)
            # What the device held, durable before it changes: cancel puts it back.
            action.undo["before"] = dev.get("data", "")
            ctx.remember([action])
            dev["data"] = dev.get("saved", {}).get(str(action.params["id"]), "")
        self._maybe_fail(action, "do")
        if dev.get("break") == "revert":  # a device that fails half-way through a revert (drills)
            raise ActionFailed(f"device {action.params['device']!r} broke during the revert")

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        self._maybe_fail(action, "invalidate")

    def cancel(self, action: Action, ctx: RunContext) -> None:
        self._cancel_guard(action)
        if "before" not in action.undo:
            return  # do never changed the data
        with _world(action.params["world"]) as world:
            self._device(world, action)["data"] = action.undo["before"]


class Noop(ActionType):
    """Do nothing, touching no file: for measuring the executor's own overhead."""

    name = "sim.noop"
    params = (Param("key", "str", required=True, doc="makes the target sim:noop/<key>"),)

    def target(self, action: Action) -> str:
        return "sim:noop/" + str(action.params["key"])

    def do(self, action: Action, ctx: RunContext) -> None:
        return None

    def cancel(self, action: Action, ctx: RunContext) -> None:
        return None


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    for cls in (Snapshot, Overlay, Delete, Revert, Noop):
        register(cls)
