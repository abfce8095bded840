"""``fault``: an action that fails at a chosen phase, like QEMU's ``abort`` transaction
action, for drills on real transactions: put one at the end of a spec and watch the
whole group roll back."""

from __future__ import annotations

from blktx import Action, ActionFailed, ActionType, Param, Refused, Register, RunContext, hookimpl


class Fault(ActionType):
    """Fail on purpose at the chosen phase; touches nothing."""

    name = "fault"
    params = (
        Param("phase", "str", default="do", choices=("check", "do", "invalidate"), doc="the phase that fails"),
        Param("message", "str", default="fault injected", doc="the error message"),
    )

    def target(self, action: Action) -> str:
        return f"fault:#{action.index}"

    def check(self, action: Action, ctx: RunContext) -> None:
        if action.params["phase"] == "check":
            raise Refused(action.params["message"])

    def do(self, action: Action, ctx: RunContext) -> None:
        if action.params["phase"] == "do":
            raise ActionFailed(action.params["message"])

    def invalidate(self, action: Action, ctx: RunContext) -> None:
        if action.params["phase"] == "invalidate":
            raise ActionFailed(action.params["message"])

    def cancel(self, action: Action, ctx: RunContext) -> None:
        return None


@hookimpl
def blktx_register_action_types(register: Register) -> None:
    register(Fault)
