"""The group-snapshot types of the ``libvirt`` plugin: ``libvirt.snapshot-delete``
(finalize) and ``libvirt.snapshot-revert``, planned by ``blktx delete``/``revert``
from the members ``libvirt.snapshot`` made.

Both are given the domain (its UUID, from the catalog), the snapshot's name and the
ownership token ``libvirt.snapshot`` wrote into the snapshot's ``<description>``; a
snapshot of that name without the token (a same-named remake) is refused at check
and never deleted.

A revert is refused at check on every libvirt: below 9.9 libvirt cannot revert an
external snapshot at all, and from 9.9 on it reverts one by stopping a running
domain and deleting the domain's current overlays, which the rollback of a group
could not undo (see docs/backends.md). Nothing of the group is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

from blktx import Action, ActionFailed, ActionType, Param, Refused, RunContext
from blktx_plugins._libvirt_base import DELETE_EXTERNAL, REVERT_EXTERNAL, _find, _msg, _ours, libvirt, version_text, xml
from blktx_plugins.libvirt import _DOMAIN, _LibvirtType

_NAME = Param("name", "str", required=True, doc="the snapshot's name")
_TOKEN = Param(
    "token",
    "str",
    default="",
    doc="the ownership token libvirt.snapshot wrote into the snapshot's description (the catalog passes it): "
    "a snapshot of the name without it is refused",
)


def _where(action: Action) -> str:
    return f"domain {action.undo.get('domain_name') or action.params['domain']} at {action.params['uri']}"


def _release(number: int) -> str:
    """``9.9`` for 9009000: how a needed libvirt release is named."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}"


def _owned(action: Action, dom: Any) -> Any:
    """The snapshot the action names; refused when there is none, or when it lacks the
    action's token (somebody remade it under the name)."""
    name, token = action.params["name"], action.params.get("token") or ""
    snap = _find(dom, name)
    if snap is None:
        raise Refused(f"{_where(action)} has no snapshot named {name!r}", hint="`virsh snapshot-list DOMAIN` lists them")
    if token and not _ours(snap, token):
        raise Refused(
            f"{_where(action)}: snapshot {name!r} is not the one blktx made (its description lacks the token "
            f"{token}): a snapshot remade under the same name is never touched",
            hint="`virsh snapshot-dumpxml DOMAIN NAME` shows its description; "
            "`blktx list --verify` shows the members that are gone",
        )
    return snap


def _external(root: ET.Element) -> bool:
    memory = root.find("memory")
    return any(d.get("snapshot") == "external" for d in root.findall("./disks/disk")) or (
        memory is not None and memory.get("snapshot") == "external"
    )


class SnapshotDelete(_LibvirtType):
    """Delete a domain's snapshot through libvirt (finalize: after the commit point)."""

    name = "libvirt.snapshot-delete"
    finalize = True
    #: several group snapshots of one domain may be deleted in one transaction
    shares_target = True
    params = (*_DOMAIN, Param("name", "str", required=True, doc="the snapshot to delete"), _TOKEN)

    def check(self, action: Action, ctx: RunContext) -> None:
        conn, dom = self._identify(action, ctx)
        name = action.params["name"]
        snap = _owned(action, dom)
        root = xml(snap.getXMLDesc(0))
        version = conn.getLibVersion()
        if _external(root) and version < DELETE_EXTERNAL:
            raise Refused(
                f"{_where(action)}: deleting external snapshot {name!r} needs libvirt >= "
                f"{version_text(DELETE_EXTERNAL)}; this host runs {version_text(version)}"
            )
        if snap.numChildren(0) and not dom.isActive():
            # libvirt (9.0) merges a snapshot that newer ones are based on only in a
            # running or paused domain: of a shut-off one, its delete fails half-way.
            raise Refused(
                f"{_where(action)}: snapshot {name!r} has newer snapshots based on it, and the domain is shut off: "
                f"libvirt {version_text(version)} merges such a snapshot only while the domain runs",
                hint="start the domain (or delete the newer snapshots first)",
            )
        claimed: dict[tuple[str, str], int] = ctx.resource("libvirt.snapshot-delete.claimed", dict)
        key = (action.target, name)
        if key in claimed:
            raise Refused(f"conflicts with action #{claimed[key]}: both delete snapshot {name!r} of {_where(action)}")
        claimed[key] = action.index
        action.undo["created"] = root.findtext("creationTime")

    def do(self, action: Action, ctx: RunContext) -> None:
        _, dom = self._open(action, ctx)
        name, token = action.params["name"], action.params.get("token") or ""
        snap = _find(dom, name)
        if snap is None:
            return  # already deleted (a retry)
        if token:
            if not _ours(snap, token):
                return  # ours is gone (a retry, or deleted by hand): this one of the name is somebody else's
        elif xml(snap.getXMLDesc(0)).findtext("creationTime") != action.undo.get("created"):
            raise ActionFailed(
                f"snapshot {name!r} of {_where(action)} is not the one checked (another of the name was made since): "
                "it was left alone"
            )
        try:
            snap.delete(0)
        except libvirt.libvirtError as exc:
            raise ActionFailed(f"{_where(action)}: deleting snapshot {name!r}: {_msg(exc)}") from None


class SnapshotRevert(_LibvirtType):
    """Bring a domain's disks back to a snapshot blktx made: refused at check (see the module's doc)."""

    name = "libvirt.snapshot-revert"
    params = (*_DOMAIN, _NAME, _TOKEN)

    def check(self, action: Action, ctx: RunContext) -> None:
        conn, dom = self._identify(action, ctx)
        name = action.undo.get("domain_name") or action.params["domain"]
        snap = _owned(action, dom)
        kind = "external" if _external(xml(snap.getXMLDesc(0))) else "internal"
        version = conn.getLibVersion()
        what = f"reverting {kind} snapshot {action.params['name']} of domain {name}"
        if kind == "external" and version < REVERT_EXTERNAL:
            raise Refused(
                f"{what} needs libvirt >= {_release(REVERT_EXTERNAL)} (this host has {version_text(version)})",
                hint="nothing of the group was touched; the state the snapshot kept is in the backing files of its "
                "overlays (`virsh snapshot-dumpxml DOMAIN NAME`): boot the domain from them by hand, or upgrade libvirt",
            )
        raise Refused(
            f"{what} is not done by blktx: libvirt {version_text(version)} reverts it by stopping a running "
            "domain and deleting its current overlays, which the rollback of a group could not undo",
            hint="nothing of the group was touched; `virsh snapshot-revert DOMAIN NAME` reverts this domain alone "
            "(snapshot it first to keep its current state)",
        )

    def do(self, action: Action, ctx: RunContext) -> None:
        raise ActionFailed(f"{self.name} is refused at check: nothing was reverted")

    def cancel(self, action: Action, ctx: RunContext) -> None:
        return None  # its do never changes anything


#: The action types this module adds to the libvirt plugin.
TYPES: tuple[type[ActionType], ...] = (SnapshotDelete, SnapshotRevert)
