"""Every hook a blktx plugin can implement. These docstrings are the plugin reference.

Implement a hook with :data:`blktx.hookimpl` in a module listed under the ``blktx``
entry-point group, and give it only the arguments you need (pluggy passes them by
name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from blktx.actiontype import Action, ActionType
    from blktx.context import RunContext
    from blktx.events import Event, Hold


class Register(Protocol):
    """What :func:`blktx_register_action_types` is given: call it once per type."""

    def __call__(self, cls: type[ActionType], /) -> None: ...


hookspec = pluggy.HookspecMarker("blktx")
#: Mark a function of your plugin module as a blktx hook implementation.
hookimpl = pluggy.HookimplMarker("blktx")

# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


@hookspec
def blktx_register_action_types(register: Register) -> None:
    """Register the action types this plugin provides.

    :param register: call it once per :class:`~blktx.ActionType` subclass. The core
        checks the declaration (a ``plugin.verb`` name not taken by another plugin,
        well-formed parameters, a lifecycle that keeps the core states and
        transitions) and records which plugin registered it. A malformed type is
        reported with the plugin's name and skipped; the plugin's other types and
        the other plugins still load.
    """


# ---------------------------------------------------------------------------
# Quiescing: keep targets still around the do and invalidate phases
# ---------------------------------------------------------------------------


@hookspec
def blktx_quiesce(ctx: RunContext, actions: Sequence[Action]) -> list[Hold] | None:
    """Pause or freeze what the transaction's actions need still.

    Called after every target is locked and before the first ``do``, only when the
    transaction's ``quiesce`` option is not ``"none"`` (read it from
    ``ctx.options.quiesce``). Pause only what you own (for example the VMs of your
    actions) and leave alone whatever was already paused. Call
    ``ctx.holding(holds)`` with the holds you are about to take *before* pausing
    anything: blktx journals them at once, so ``blktx recover`` resumes them even
    if the run is killed in the middle of this hook (your resume must then cope
    with a target that was never paused).

    :param ctx: the run's context.
    :param actions: every action of the transaction.
    :return: one :class:`~blktx.events.Hold` per thing you paused; each is recorded
        in the journal and handed to :func:`blktx_resume` in every outcome,
        including a failure, an interrupt, or ``blktx recover`` after a crash.
        Raising fails the transaction before anything was done; holds returned by
        other plugins are still resumed.
    """


@hookspec(firstresult=True)
def blktx_resume(ctx: RunContext, hold: Hold) -> bool | None:
    """Resume one thing that :func:`blktx_quiesce` paused.

    Called right after the commit point, or after a rollback, newest hold first.
    Stops at the first non-None result: return ``True`` when ``hold.kind`` is yours
    and you resumed it, ``None`` when it is not yours. Raise when it could not be
    resumed: the run reports it left behind (exit status 3), the journal keeps it,
    and ``blktx recover`` calls you again. Must be idempotent: it may be called
    again for a hold that was already resumed.

    :param ctx: the run's context (in ``blktx recover``, a context with the
        journal's transaction id).
    :param hold: what was paused, as your quiesce hook returned it.
    """


@hookspec
def blktx_resume_many(ctx: RunContext, holds: list[Hold]) -> list[Hold] | None:
    """Resume several holds of one kind at once; return the ones you resumed.

    Optional, for plugins that can end many windows faster together than one by
    one (``qmp`` sends every ``cont`` from one event loop). The executor calls it
    for each run of consecutive holds of one kind, newest run first; whatever no
    implementation returns goes to :func:`blktx_resume`, one hold at a time. Set
    ``hold.end`` (``time.monotonic()``) when each window really ended, or the
    executor uses the time the call returned. Same idempotence as
    :func:`blktx_resume`.

    :param ctx: the run's context.
    :param holds: holds of one ``kind``, newest first.
    """


# ---------------------------------------------------------------------------
# Switching users over to a new image
# ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def blktx_switch_active_image(ctx: RunContext, action: Action, device: str, old: str, new: str) -> bool | None:
    """Make ``new`` the active image of ``device`` in a management stack's configuration.

    Called by ``qcow2.external-create`` in invalidate (``old`` -> ``new``) and in
    cancel (``new`` -> ``old``), before blktx's own default (re-pointing the
    ``device`` symlink). Stops at the first non-None result: return ``True`` when
    you switched it yourself (the symlink is then left alone), ``None`` to let the
    default run. Must be idempotent.

    :param device: the stable path that users open (the spec's ``device``).
    :param old: the image that is active before the switch.
    :param new: the image that is active after the switch.
    """


# ---------------------------------------------------------------------------
# Cleaning up after a dead run
# ---------------------------------------------------------------------------


@hookspec
def blktx_cleanup(ctx: RunContext) -> None:
    """Remove what a plugin kept for the run ``ctx.txid`` outside any action: a
    storage daemon's temporary folder, a socket, a state file.

    Called by ``blktx recover`` once the transaction is over (rolled back or
    forward), in a new process: the run that made those things is dead. Find
    them by the transaction id (name them after it) and remove only what is
    provably yours. Must be idempotent. An exception is reported as a warning.

    :param ctx: a context with the recovered transaction's id and options.
    """


# ---------------------------------------------------------------------------
# Observing a run
# ---------------------------------------------------------------------------


@hookspec
def blktx_event(event: Event) -> None:
    """Observe a run: phases starting and ending, actions changing state, failures,
    quiesce windows and the outcome. For progress bars, logs and metrics.

    Called in the executor's thread, synchronously: keep it cheap. An exception
    raised here is reported as a warning and never changes the outcome.

    :param event: what happened (:class:`~blktx.events.Event`).
    """
