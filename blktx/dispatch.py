"""Run one step over units, one after another or in a thread pool: the one place
that knows ``jobs``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

U = TypeVar("U")


def dispatch(units: Sequence[U], work: Callable[[U], None], jobs: int,
             stop: Callable[[], bool] = lambda: False, name: str = "blktx") -> None:
    """Call ``work`` on every unit: serially when ``jobs`` <= 1 (stopping as soon as
    ``stop()`` says so), else up to ``jobs`` at once (every unit runs: units are
    independent, and a phase is judged as a whole)."""
    if jobs <= 1 or len(units) <= 1:
        for unit in units:
            work(unit)
            if stop():
                return
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix=name) as pool:
        list(pool.map(work, units))
