"""Hypothesis strategies for transactions and failure plans (needs ``hypothesis``)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

DEVICES = ["d0", "d1", "d2", "d3", "d4", "d5"]
NAMES = ["a", "b", "c"]
FAIL = st.sampled_from(["", "", "", "", "", "", "do", "invalidate"])
CANCEL_FAILS = st.sampled_from([False, False, False, True])

Spec = list[tuple[str, dict[str, Any]]]


@st.composite
def failure_plans(draw: Any, actions: int) -> tuple[int, str]:
    """Where to put a ``fault`` action among ``actions`` others, and the phase it fails in."""
    return draw(st.integers(0, actions)), draw(st.sampled_from(["check", "do", "invalidate"]))


def with_fault(spec: Spec, plan: tuple[int, str]) -> Spec:
    """``spec`` with a ``fault`` action inserted as ``plan`` says."""
    at, phase = plan
    return [*spec[:at], ("fault", {"phase": phase}), *spec[at:]]


@st.composite
def sim_worlds(draw: Any) -> dict[str, Any]:
    """Devices of the ``sim`` backend, each with a few existing snapshots."""
    devices = {}
    for d in DEVICES:
        names = draw(st.lists(st.sampled_from(NAMES), max_size=3))
        devices[d] = {"snapshots": {str(i + 1): n for i, n in enumerate(names)}, "layers": [f"{d}.base"], "active": f"{d}.base"}
    return devices


@st.composite
def sim_transactions(draw: Any, world: dict[str, Any]) -> Spec:
    """Mostly valid ``sim`` transactions over ``world`` with failures at any action and
    phase, failing cancels and failing finalize steps. An overlay owns its device, so
    conflicts stay rare."""
    actions: Spec = []
    overlaid: set[str] = set()
    used: set[str] = set()
    for n in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["snapshot", "snapshot", "overlay", "delete", "fault"]))
        device = draw(st.sampled_from(DEVICES))
        if device in overlaid or (kind == "overlay" and device in used):
            continue
        used.add(device)
        if kind == "snapshot":
            actions.append(
                (
                    "sim.snapshot",
                    {
                        "device": device,
                        "name": draw(st.sampled_from(NAMES)),
                        "fail": draw(FAIL),
                        "fail_cancel": draw(CANCEL_FAILS),
                    },
                )
            )
        elif kind == "overlay":
            overlaid.add(device)
            actions.append(
                (
                    "sim.overlay",
                    {"device": device, "layer": f"{device}.o{n}", "fail": draw(FAIL), "fail_cancel": draw(CANCEL_FAILS)},
                )
            )
        elif kind == "delete":
            existing = sorted(set(world[device]["snapshots"].values()))
            if existing:
                actions.append(
                    (
                        "sim.delete",
                        {
                            "device": device,
                            "name": draw(st.sampled_from(existing)),
                            "fail": draw(st.sampled_from(["", "", "", "finalize"])),
                            "fail_times": draw(st.sampled_from([-1, 1])),
                        },
                    )
                )
        else:
            actions.append(("fault", {"phase": draw(st.sampled_from(["do", "invalidate", "invalidate", "check"]))}))
    return actions
