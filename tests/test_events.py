"""Holds and the proof of the cut (blktx.events)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from blktx.events import Hold, proof_of_cut


def test_a_member_taken_after_a_hold_ended_is_outside_the_cut() -> None:
    now, pc = time.monotonic(), time.perf_counter()
    holds = [Hold("k", "vm0", start=now, end=now + 0.10), Hold("k", "vm1", start=now + 0.02, end=now + 0.08)]
    actions = [SimpleNamespace(index=0), SimpleNamespace(index=1), SimpleNamespace(index=2)]
    cut = {0: ("do", pc + 0.03, pc + 0.05), 1: ("do", pc + 0.05, pc + 0.09)}
    proof = proof_of_cut(holds, actions, cut)
    assert proof is not None and proof["holds"] == 2 and abs(proof["common_window_ms"] - 60) < 1
    assert [m["inside"] for m in proof["members"]] == [True, False, None]
    assert proof["inside"] is False
    assert proof_of_cut([], actions, cut) is None
