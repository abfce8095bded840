"""blktx: group snapshots of many block devices as one all-or-none transaction."""

from __future__ import annotations

from blktx.actiontype import Action, ActionType, Leftover
from blktx.context import Options, RunContext
from blktx.errors import ActionFailed, ActionFailures, BlktxError, InvalidTransaction, Problem, Refused
from blktx.events import Event, Hold
from blktx.executor import Executor
from blktx.hookspecs import Register, hookimpl
from blktx.params import Param
from blktx.result import Result
from blktx.spec import ActionSpec, Transaction, load_spec, parse_spec
from blktx.states import CANCELED, CREATED, INVALIDATED, START, Lifecycle, Transition

__version__ = "0.1.0"

__all__ = [
    "CANCELED",
    "CREATED",
    "INVALIDATED",
    "START",
    "Action",
    "ActionFailed",
    "ActionFailures",
    "ActionSpec",
    "ActionType",
    "BlktxError",
    "Event",
    "Executor",
    "Hold",
    "InvalidTransaction",
    "Leftover",
    "Lifecycle",
    "Options",
    "Param",
    "Problem",
    "Refused",
    "Register",
    "Result",
    "RunContext",
    "Transaction",
    "Transition",
    "hookimpl",
    "load_spec",
    "parse_spec",
]
