"""Placeholder: filled in by the revert/delete work of issue 13."""

from __future__ import annotations

from blktx import ActionType

#: The action types this module adds to the qcow2 plugin.
TYPES: tuple[type[ActionType], ...] = ()
