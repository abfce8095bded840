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
