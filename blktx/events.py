"""Records the executor hands to plugins: progress events and quiesce holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Something that happened in a run, for progress, logging and metrics.

    ``kind`` is one of ``phase-start``, ``phase-end``, ``action`` (one action
    changed state), ``failure``, ``quiesced``, ``resumed``, ``outcome``.
    """

    kind: str
    txid: str
    phase: str = ""
    action: int | None = None
    state: str | None = None
    target: str | None = None
    count: int = 0
    total: int = 0
    message: str = ""
    seconds: float = 0.0


@dataclass
class Hold:
    """Something a quiesce hook paused or froze, that must be resumed in every outcome.

    ``kind`` names the plugin's resume handler (``qmp.pause``), ``data`` is what it
    needs to resume in another process (recorded in the journal), ``start`` and
    ``end`` (monotonic seconds) bound the quiesce window that the result reports.
    """

    kind: str
    target: str
    data: dict[str, Any] = field(default_factory=dict)
    start: float = 0.0
    end: float | None = None

    @property
    def window(self) -> float | None:
        return None if self.end is None else self.end - self.start


def proof_of_cut(holds: list[Hold], actions: list[Any], cut: dict[int, tuple[str, float, float]]) -> dict[str, Any] | None:
    """Whether every member's point-in-time step (``cut``: action index -> step, its
    ``perf_counter`` start and end) ran inside the window that all ``holds`` shared,
    from the last hold taken to the first one ended. None without holds. A hold whose
    plugin knows better than blktx's clock when it began and ended (QEMU's STOP and
    RESUME events) carries those times and ``data["clock"]``."""
    import time

    held = [h for h in holds if h.start and h.end is not None]
    if not held:
        return None
    # holds are stamped with time.monotonic(), steps with perf_counter(): one clock here
    shift = time.monotonic() - time.perf_counter()
    first, last = max(h.start for h in held), min(h.end for h in held if h.end is not None)
    members: list[dict[str, Any]] = []
    for a in actions:
        if a.index in cut:
            step, began, ended = cut[a.index]
            began, ended = began + shift, ended + shift
            members.append(
                {
                    "action": a.index,
                    "step": step,
                    "began_ms": round((began - first) * 1000, 3),
                    "ended_ms": round((ended - first) * 1000, 3),
                    "inside": first <= began and ended <= last,
                }
            )
        else:
            members.append(
                {
                    "action": a.index,
                    "inside": None,
                    "why": "taken before the window: its type declares that nothing held writes to it",
                }
            )
    return {
        "common_window_ms": round((last - first) * 1000, 3),
        "holds": len(held),
        # "qemu": every hold's bounds are its VM's own STOP and RESUME events; else blktx's
        # clock around the commands that took and ended them (a wider, safe window)
        "clock": "qemu" if all(h.data.get("clock") == "qemu" for h in held) else "blktx",
        "inside": all(m["inside"] is not False for m in members),
        "members": members,
    }
